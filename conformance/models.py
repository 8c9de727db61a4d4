"""Models the conformance kit runs on, with no download.

* :data:`BUNDLED_MODEL` -- ``pystdlib-llama``, a ~4.2M-parameter Llama trained on
  the Python standard library by ``scripts/train_bundled_model.py`` (in the repository, not the wheel) and shipped
  with the package (bf16 safetensors + its own byte-level BPE tokenizer).  Its
  next-token distributions are peaked like a real LM's.
* :data:`VARIANT_RECIPES` -- tiny *random* models for architecture coverage (tied
  embeddings, Qwen2 q/k/v biases, grouped-query attention).  They are built on
  demand, deterministically, by :func:`build_variant` into a cache directory,
  and share the bundled tokenizer.
* :func:`resolve_model` -- turns a user-facing spec (``"bundled"``, a variant
  name, or a local directory) into a model directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

__all__ = [
    "BUNDLED_MODEL",
    "VARIANT_RECIPES",
    "Family",
    "ModelRecipe",
    "build_variant",
    "recipe_hash",
    "resolve_model",
]

from conformance.bundled import BUNDLED_MODEL

Family = Literal["llama", "qwen2"]

#: Bump when :func:`build_variant` changes how weights are produced, so that
#: cached builds from an older kit are not reused.
_BUILD_FORMAT = 1

#: Tokenizer files copied from the bundled model into every variant.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

#: Files whose presence marks a finished variant build.
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "recipe.json")

#: Shared shape of the tiny variants; recipes override individual keys.
_TINY_BASE: dict[str, Any] = {
    "vocab_size": 2048,  # the bundled tokenizer's vocabulary
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 2,
}

_ARCHITECTURES: dict[str, str] = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@dataclass(frozen=True)
class ModelRecipe:
    """How to build one tiny random model deterministically.

    Attributes:
        name: Spec name, also the prefix of the cache directory.
        family: Architecture family: ``"llama"`` (``LlamaForCausalLM``) or
            ``"qwen2"`` (``Qwen2ForCausalLM``, which has q/k/v biases).
        config_overrides: Config keys applied on top of the shared tiny shape.
            Stored read-only.
        seed: Seed of the generator that draws every weight.
        init_std: Standard deviation of the normal init of every weight matrix,
            embedding and bias (norm weights are ``1 + N(0, init_std)``).  Large
            compared with a real init (0.02) so that next-token distributions
            are peaked rather than nearly uniform: at 0.22 the tiny variants'
            mean next-token entropy is ~4.5 nats (vs ln(2048) = 7.6).
    """

    name: str
    family: Family
    config_overrides: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    init_std: float = 0.22

    def __post_init__(self) -> None:
        if self.family not in _ARCHITECTURES:
            raise ValueError(f"unknown architecture family {self.family!r} for recipe {self.name!r}")
        object.__setattr__(self, "config_overrides", MappingProxyType(dict(self.config_overrides)))

    def __hash__(self) -> int:
        return hash(_canonical_json(self.to_json_dict()))

    def to_json_dict(self) -> dict[str, Any]:
        """Plain-JSON form (used for hashing and recorded in the build)."""
        return {
            "name": self.name,
            "family": self.family,
            "config_overrides": dict(self.config_overrides),
            "seed": self.seed,
            "init_std": self.init_std,
        }

    def config_dict(self) -> dict[str, Any]:
        """Full config kwargs: the tiny base shape with this recipe's overrides."""
        cfg = dict(_TINY_BASE)
        cfg.update(self.config_overrides)
        return cfg


VARIANT_RECIPES: dict[str, ModelRecipe] = {
    r.name: r
    for r in (
        ModelRecipe(
            name="tied-llama",
            family="llama",
            config_overrides={"tie_word_embeddings": True, "head_dim": 64},
            seed=1,
            init_std=0.22,
        ),
        ModelRecipe(
            name="qwen2-bias",
            family="qwen2",
            config_overrides={},  # Qwen2 always has q/k/v biases; the init makes them nonzero
            seed=2,
            init_std=0.22,
        ),
        ModelRecipe(
            name="gqa-llama",
            family="llama",
            config_overrides={"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32},
            seed=3,
            init_std=0.22,
        ),
    )
}
"""Tiny random variants for architecture coverage, keyed by name."""


def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _transformers_major() -> int:
    from importlib.metadata import version

    return int(version("transformers").split(".")[0])


def _tokenizer_digest() -> str:
    h = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        p = BUNDLED_MODEL / name
        if p.is_file():
            h.update(name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def recipe_hash(recipe: ModelRecipe) -> str:
    """Stable hex digest identifying a build of ``recipe``.

    sha256 of canonical JSON of the recipe, the transformers major version (the
    model classes and serialisation come from it), the build-format version of
    this module and the bundled tokenizer's files (which are copied in).
    """
    payload = {
        "recipe": recipe.to_json_dict(),
        "transformers_major": _transformers_major(),
        "build_format": _BUILD_FORMAT,
        "tokenizer_sha256": _tokenizer_digest(),
    }
    return hashlib.sha256(_canonical_json(payload).encode("ascii")).hexdigest()


def _is_complete(path: Path) -> bool:
    return path.is_dir() and all((path / f).is_file() for f in _REQUIRED_FILES)


def _make_model(recipe: ModelRecipe) -> Any:
    """Instantiate and deterministically initialise the fp32 model for ``recipe``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kwargs = recipe.config_dict()
    kwargs["initializer_range"] = recipe.init_std
    if recipe.family == "llama":
        config: Any = LlamaConfig(**kwargs)
        cls: Any = LlamaForCausalLM
    else:
        config = Qwen2Config(**kwargs)
        cls = Qwen2ForCausalLM
    config.architectures = [_ARCHITECTURES[recipe.family]]

    # fork_rng: the transformers default init uses the global RNG; leave the
    # caller's RNG state untouched.  Every parameter is then overwritten from a
    # dedicated generator, in sorted-name order, so the weights depend only on
    # the recipe (not on transformers' init code).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = cls(config).to(torch.float32)
    gen = torch.Generator(device="cpu").manual_seed(recipe.seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32) * recipe.init_std
            if "norm" in name.rsplit(".", 2)[-2]:
                param.copy_(1.0 + noise)
            else:
                param.copy_(noise)
    if recipe.family == "qwen2":
        biases = [n for n, p in model.named_parameters() if n.endswith(".bias")]
        assert biases and all(model.get_parameter(n).abs().sum() > 0 for n in biases), "qwen2 biases must be nonzero"
    model.eval()
    return model


def _write_variant(recipe: ModelRecipe, digest: str, dest: Path) -> None:
    import torch
    import transformers

    model = _make_model(recipe)
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(str(dest), safe_serialization=True)
    # No sampling defaults may leak into generation: vLLM and HF run with their defaults.
    gen_cfg = dest / "generation_config.json"
    if gen_cfg.exists():
        gen_cfg.unlink()
    cfg_path = dest / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["torch_dtype"] = "bfloat16"  # older readers; transformers 5 writes "dtype"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for name in _TOKENIZER_FILES:
        src = BUNDLED_MODEL / name
        if src.is_file():
            shutil.copyfile(src, dest / name)
    provenance = {
        "recipe": recipe.to_json_dict(),
        "recipe_hash": digest,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }
    # Written last: its presence (with the rest) marks a finished build.
    (dest / "recipe.json").write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")


def build_variant(recipe: ModelRecipe, cache_dir: Path) -> Path:
    """Build ``recipe`` into ``cache_dir/<name>-<hash[:12]>/`` and return that directory.

    The directory holds ``config.json``, bf16 ``model.safetensors``, the bundled
    tokenizer's files and ``recipe.json`` (provenance).  A complete existing
    build is reused.  The model is written to a temporary sibling directory and
    moved into place with :func:`os.replace`, so an interrupted build never
    leaves a half-written model behind, and concurrent builders (e.g. pytest-xdist
    workers) agree on one result.
    """
    if not (BUNDLED_MODEL / "tokenizer.json").is_file():
        raise FileNotFoundError(f"bundled tokenizer missing: {BUNDLED_MODEL / 'tokenizer.json'}")
    cache_dir = Path(cache_dir)
    digest = recipe_hash(recipe)
    final = cache_dir / f"{recipe.name}-{digest[:12]}"
    if _is_complete(final):
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    if final.exists():  # incomplete leftovers (not produced by this function): rebuild
        shutil.rmtree(final, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=cache_dir))
    try:
        _write_variant(recipe, digest, tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            # Another process finished first (non-empty target): keep theirs.
            if not _is_complete(final):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve_model(spec: str, cache_dir: Path) -> Path:
    """Turn a model spec into a model directory.

    Args:
        spec: ``"bundled"`` for :data:`BUNDLED_MODEL`; a key of
            :data:`VARIANT_RECIPES` (built or reused in ``cache_dir``); or a path
            to a local directory containing ``config.json``.
        cache_dir: Where variants are built.

    Raises:
        ValueError: ``spec`` is none of the above.
    """
    if spec == "bundled":
        return BUNDLED_MODEL
    if spec in VARIANT_RECIPES:
        return build_variant(VARIANT_RECIPES[spec], cache_dir)
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    known = ", ".join(["bundled", *VARIANT_RECIPES])
    raise ValueError(
        f"model spec {spec!r}: {str(path)!r} is not a directory containing config.json "
        f"(expected one of {known} or a local model directory)"
    )
