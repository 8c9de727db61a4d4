"""Config matrices: TOML files whose cells say how to start one engine.

A matrix file has an optional ``[defaults]`` table and one ``[[cell]]`` table per cell; each cell inherits
the defaults and overrides them. Every key is validated: an unknown key or a wrong value raises
:class:`MatrixError` with a one-line message naming the file, the cell and the key.

Example::

    [defaults]
    tier = "cpu"
    enforce_eager = true
    env = { VLLM_CPU_KVCACHE_SPACE = "1" }

    [[cell]]
    id = "fp32-processed"
    purpose = "exact reference cell: processed logprobs in fp32"
    dtype = "float32"
    logprobs_mode = "processed_logprobs"
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conformance.engines.registry import engine_names
from conformance.spec import LOGPROBS_MODES, LogprobsMode
from conformance.tolerances import Tolerance, precision_class, tolerance_for

DTYPES = ("float32", "bfloat16", "float16")
TIERS = ("cpu", "gpu")


class MatrixError(ValueError):
    """A matrix file or cell is invalid; the message is one line naming the file, cell and key."""


@dataclass(frozen=True)
class Cell:
    """One engine configuration. ``engine_kwargs`` go to ``vllm.LLM``; ``env`` is set for the engine's
    life (a value of '' unsets a variable, e.g. one the matrix's ``[defaults]`` set)."""

    id: str
    dtype: str
    logprobs_mode: LogprobsMode
    purpose: str = ""
    tier: str = "cpu"
    engine: str = "vllm"
    """The registry name of the engine adapter (:mod:`conformance.engines.registry`): ``vllm`` (offline
    ``vllm.LLM``), ``vllm-server`` (a ``vllm serve`` subprocess over HTTP), or a registered one."""
    model: str = "bundled"
    head_dtype: str | None = None
    enable_prefix_caching: bool | None = None
    enable_chunked_prefill: bool | None = None
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    max_model_len: int = 1024
    block_size: int | None = None
    enforce_eager: bool = True
    async_scheduling: bool | None = None
    attention_backend: str | None = None
    seed: int = 0
    start_timeout_s: float = 300.0
    requires: tuple[str, ...] = ()
    """Python modules the engine needs beyond vLLM (e.g. ``flashinfer``): without one the cell's tests skip
    with the reason instead of failing at engine start (:meth:`missing_requirement`)."""
    gpus: int = 1
    """CUDA devices a GPU cell needs (tensor / pipeline parallel cells: the world size); with fewer the
    cell's tests skip with the reason (:func:`conformance.plugin.skip_unless_runnable`)."""
    families: tuple[str, ...] | None = None
    """Test families this cell runs (``semantic``, ``inference-path``, ``stress``, ...); None: all."""
    env: Mapping[str, str] = field(default_factory=dict)
    extra_engine_kwargs: Mapping[str, Any] = field(default_factory=dict)
    tolerance_overrides: Mapping[str, float] = field(default_factory=dict)
    source: str = "<memory>"

    def runs(self, family: str | None) -> bool:
        """Whether tests of ``family`` run in this cell: untagged tests run everywhere, opt-in families
        only where listed, the others wherever ``families`` is unset or lists them."""
        if family is None:
            return True
        if self.families is None:
            return family not in OPT_IN_FAMILIES
        return family in self.families

    def missing_requirement(self) -> str | None:
        """Why this cell cannot run here (a GPU cell without CUDA is decided elsewhere), or None."""
        import importlib.util

        for module in self.requires:
            if importlib.util.find_spec(module) is None:
                return f"cell {self.id} needs the Python module {module!r}, which is not importable here"
        return None

    def engine_key(self) -> str:
        """What configures the engine itself (adapter, model, tier, keyword arguments, environment): cells
        with equal keys can share one running engine; id, purpose, families and tolerances do not count."""
        import json

        return json.dumps(
            [self.engine, self.model, self.tier, self.engine_kwargs(), dict(sorted(self.env.items()))],
            sort_keys=True,
            default=str,
        )

    @property
    def precision(self) -> str:
        return precision_class(self.tier, self.dtype, self.head_dtype)

    @property
    def tolerance(self) -> Tolerance:
        base = tolerance_for(self.tier, self.dtype, self.head_dtype)
        return base.with_overrides(dict(self.tolerance_overrides), f"{self.source}: cell {self.id!r}")

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``vllm.LLM`` (model path excluded). dtype is always explicit."""
        kwargs: dict[str, Any] = {
            "dtype": self.dtype,
            "logprobs_mode": self.logprobs_mode,
            "max_model_len": self.max_model_len,
            "enforce_eager": self.enforce_eager,
            "seed": self.seed,
            "generation_config": "vllm",
        }
        optional = {
            "enable_prefix_caching": self.enable_prefix_caching,
            "enable_chunked_prefill": self.enable_chunked_prefill,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "max_num_seqs": self.max_num_seqs,
            "block_size": self.block_size,
            "async_scheduling": self.async_scheduling,
        }
        kwargs.update({k: v for k, v in optional.items() if v is not None})
        if self.head_dtype is not None:
            kwargs["hf_overrides"] = {"head_dtype": self.head_dtype}
        if self.attention_backend is not None:
            kwargs["attention_config"] = {"backend": self.attention_backend}
        kwargs.update(self.extra_engine_kwargs)
        return kwargs


_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._+-]*$")
# Set from the cell's own keys: an engine_kwargs override would desynchronise the tolerance class or
# let generation_config="auto" change sampling defaults behind the test's back.
_RESERVED_ENGINE_KWARGS = {"dtype", "logprobs_mode", "generation_config", "hf_overrides", "model", "seed"}


def _check_type(value: Any, types: tuple[type, ...], where: str, key: str) -> None:
    if isinstance(value, bool) and bool not in types:
        raise MatrixError(f"{where}: {key} must be {' or '.join(t.__name__ for t in types)}, got {value!r}")
    if not isinstance(value, types):
        raise MatrixError(f"{where}: {key} must be {' or '.join(t.__name__ for t in types)}, got {value!r}")


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "id": (str,),
    "purpose": (str,),
    "tier": (str,),
    "engine": (str,),
    "model": (str,),
    "dtype": (str,),
    "logprobs_mode": (str,),
    "head_dtype": (str,),
    "enable_prefix_caching": (bool,),
    "enable_chunked_prefill": (bool,),
    "max_num_batched_tokens": (int,),
    "max_num_seqs": (int,),
    "max_model_len": (int,),
    "block_size": (int,),
    "enforce_eager": (bool,),
    "async_scheduling": (bool,),
    "attention_backend": (str,),
    "seed": (int,),
    "start_timeout_s": (int, float),
    "gpus": (int,),
    "env": (dict,),
    "engine_kwargs": (dict,),
    "tolerance": (dict,),
    "families": (list,),
    "requires": (list,),
}
FAMILIES = (
    "semantic",
    "inference-path",
    "chunked-prefill",
    "distribution",
    "precision",
    "execution-mode",
    "stress",
    "golden",
    "server",
    "weight-update",
)
OPT_IN_FAMILIES = ("chunked-prefill", "server")
"""Families that need a dedicated cell configuration (e.g. a tiny step budget) and run only where listed."""
_CHOICES: dict[str, tuple[str, ...]] = {
    "tier": TIERS,
    "dtype": DTYPES,
    "logprobs_mode": LOGPROBS_MODES,
    "head_dtype": ("float32",),
}


def _build_cell(raw: Mapping[str, Any], source: str, index: int) -> Cell:
    where = f"{source}: cell {raw.get('id', f'#{index + 1}')!r}"
    for key, value in raw.items():
        if key not in _FIELD_TYPES:
            known = ", ".join(sorted(_FIELD_TYPES))
            raise MatrixError(f"{where}: unknown key {key!r} (known: {known})")
        _check_type(value, _FIELD_TYPES[key], where, key)
        if key in _CHOICES and value not in _CHOICES[key]:
            raise MatrixError(f"{where}: {key} = {value!r} is not one of {', '.join(_CHOICES[key])}")
    if "engine" in raw and raw["engine"] not in engine_names():
        raise MatrixError(
            f"{where}: engine = {raw['engine']!r} is not a registered engine ({', '.join(engine_names())}; "
            f"see conformance.engines.registry)"
        )
    for required in ("id", "dtype", "logprobs_mode"):
        if required not in raw:
            raise MatrixError(f"{where}: missing required key {required!r}")
    if not _ID_RE.match(raw["id"]):
        raise MatrixError(f"{where}: id must be lowercase letters, digits and . _ + - (got {raw['id']!r})")
    for key in ("max_num_batched_tokens", "max_num_seqs", "max_model_len", "block_size", "gpus"):
        if key in raw and raw[key] <= 0:
            raise MatrixError(f"{where}: {key} must be positive, got {raw[key]}")
    env = raw.get("env", {})
    for name, value in env.items():
        if not isinstance(value, str):
            raise MatrixError(f"{where}: env[{name!r}] must be a string, got {value!r}")
    reserved = sorted(set(raw.get("engine_kwargs", {})) & _RESERVED_ENGINE_KWARGS)
    if reserved:
        raise MatrixError(
            f"{where}: engine_kwargs may not set {', '.join(reserved)}; the kit sets them from the cell's own keys"
        )
    families = raw.get("families")
    if families is not None:
        unknown = [f for f in families if f not in FAMILIES]
        if unknown or not families:
            raise MatrixError(f"{where}: families must be a non-empty list of {', '.join(FAMILIES)}, got {families!r}")
    requires = raw.get("requires", [])
    if not all(isinstance(m, str) and m for m in requires):
        raise MatrixError(f"{where}: requires must be a list of Python module names, got {requires!r}")
    kwargs = {k: v for k, v in raw.items() if k not in ("env", "engine_kwargs", "tolerance", "families", "requires")}
    cell = Cell(
        **kwargs,
        env=dict(env),
        extra_engine_kwargs=dict(raw.get("engine_kwargs", {})),
        tolerance_overrides=dict(raw.get("tolerance", {})),
        families=tuple(families) if families is not None else None,
        requires=tuple(requires),
        source=source,
    )
    try:
        cell.tolerance  # noqa: B018 - validates overrides and the precision class now, not mid-run
    except ValueError as exc:
        raise MatrixError(str(exc) if str(exc).startswith(source) else f"{where}: {exc}") from None
    return cell


def parse_matrix(data: Mapping[str, Any], source: str) -> list[Cell]:
    """Cells of an already-parsed matrix document (``[defaults]`` merged into each ``[[cell]]``)."""
    for key in data:
        if key not in ("defaults", "cell"):
            raise MatrixError(f"{source}: unknown top-level key {key!r} (known: cell, defaults)")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise MatrixError(f"{source}: [defaults] must be a table")
    cells_raw = data.get("cell", [])
    if not isinstance(cells_raw, list) or not cells_raw:
        raise MatrixError(f"{source}: no [[cell]] tables")
    cells: list[Cell] = []
    seen: set[str] = set()
    for index, raw in enumerate(cells_raw):
        if not isinstance(raw, dict):
            raise MatrixError(f"{source}: cell #{index + 1} must be a table ([[cell]]), got {raw!r}")
        merged = {**defaults, **raw}
        for table in ("env", "engine_kwargs", "tolerance"):
            if table in defaults and table in raw:
                if not isinstance(defaults[table], dict) or not isinstance(raw[table], dict):
                    raise MatrixError(
                        f"{source}: cell #{index + 1}: {table} must be a table in [defaults] and the cell"
                    )
                merged[table] = {**defaults[table], **raw[table]}
        cell = _build_cell(merged, source, index)
        if cell.id in seen:
            raise MatrixError(f"{source}: duplicate cell id {cell.id!r}")
        seen.add(cell.id)
        cells.append(cell)
    return cells


def load_matrix(path: Path) -> list[Cell]:
    """Load and validate a matrix file; every problem is a one-line :class:`MatrixError`."""
    if not path.is_file():
        raise MatrixError(f"matrix file not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise MatrixError(f"{path}: not valid TOML: {exc}") from None
    return parse_matrix(data, str(path))


def select_cells(cells: Sequence[Cell], selection: Sequence[str], source: str) -> list[Cell]:
    """Cells whose id is in ``selection`` (all when empty); an unknown id is a :class:`MatrixError`."""
    if not selection:
        return list(cells)
    ids = {c.id for c in cells}
    unknown = [s for s in selection if s not in ids]
    if unknown:
        raise MatrixError(f"{source}: no cell named {', '.join(map(repr, unknown))} (cells: {', '.join(sorted(ids))})")
    return [c for c in cells if c.id in selection]
