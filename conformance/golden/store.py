"""Golden tensors: what one engine build returned for a fixed set of cases, stored to compare later builds.

Layout under a golden directory (``--parity-golden-dir``, default ``<rootdir>/golden``)::

    manifest.json                                   one entry per (model, cell, case)
    <model>/<cell>/<case>.safetensors               the tensors of one entry

A file holds, for the case's sequences concatenated: ``prompt_ids`` / ``prompt_offsets``,
``completion_ids`` / ``completion_offsets``, ``sampled_logprobs`` (the engine's value of each completion
token) and ``topk_ids`` / ``topk_logprobs`` (``[completion tokens, k]``, id -1 / value -inf where the
engine returned fewer). Its manifest entry records the vLLM / torch / transformers versions, the device,
the model content hash, the cell, the sampling parameters, the tolerance verification uses, the kit
version and the file's SHA-256.

Every write is atomic (a temp file in the same directory, then :func:`os.replace`), so a crash never
leaves a half-written file. Every problem with a golden (missing, corrupt, incompatible) is a one-line
:class:`GoldenError` naming the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conformance.spec import SamplingSpec

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
RECORD_COMMAND = "pytest -m golden --parity-record-golden"

GOLDEN_PROMPTS: tuple[int, ...] = (0, 1, 2)
"""Prompt indices (into the session's prompt set) every golden case uses; the ids are stored in the file."""
GOLDEN_PROMPT_TOKENS = 24
"""Prompts are cut to this many tokens: replay asks for full-vocabulary prompt logprobs at every position."""

GOLDEN_CASES: dict[str, SamplingSpec] = {
    # Greedy: verification also re-generates and reports the exact token agreement rate.
    "greedy": SamplingSpec(temperature=0.0, max_tokens=16, logprobs=5, ignore_eos=True),
    # Seeded sampling with the truncations RL rollouts use. Only shift-invariant processing (temperature,
    # top-k/p, min-p, additive penalties): replay reads raw *logprobs*, which equal the logits up to a
    # per-position constant, and a repetition penalty (z/r for z > 0) would need the logits themselves.
    "t0.8-topk20": SamplingSpec(temperature=0.8, top_k=20, max_tokens=16, logprobs=5, seed=101, ignore_eos=True),
    "t1.0-topp0.9": SamplingSpec(temperature=1.0, top_p=0.9, max_tokens=16, logprobs=5, seed=202, ignore_eos=True),
    "t0.7-minp-penalties": SamplingSpec(
        temperature=0.7,
        min_p=0.05,
        frequency_penalty=0.4,
        presence_penalty=0.2,
        max_tokens=16,
        logprobs=5,
        seed=303,
        ignore_eos=True,
    ),
}


class GoldenError(RuntimeError):
    """A golden file or manifest is missing, corrupt or incompatible; the message is one line naming it."""


@dataclass(frozen=True)
class GoldenCase:
    """One case's recorded engine output (all lists aligned per sequence)."""

    spec: SamplingSpec
    prompts: list[tuple[int, ...]]
    completions: list[list[int]]
    sampled: list[list[float]]
    """The engine's value of each completion token."""
    topk: list[list[dict[int, float]]]
    """Per sequence and position, token id -> value of the engine's top-n (sampled token excluded)."""


def entry_key(model: str, cell: str, case: str) -> str:
    return f"{model}/{cell}/{case}"


def file_for(root: Path, model: str, cell: str, case: str) -> Path:
    return root / model / cell / f"{case}.safetensors"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_hash(model_dir: Path) -> str:
    """SHA-256 over the model's config, tokenizer and weight files (names and bytes, sorted)."""
    h = hashlib.sha256()
    files = sorted(
        p
        for p in model_dir.iterdir()
        if p.is_file() and (p.suffix in (".safetensors", ".bin") or p.name in ("config.json", "tokenizer.json"))
    )
    if not files:
        raise GoldenError(f"{model_dir}: no config/tokenizer/weight files to hash")
    for p in files:
        h.update(p.name.encode() + b"\0")
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same directory and :func:`os.replace`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def spec_from_kwargs(kwargs: Mapping[str, Any]) -> SamplingSpec:
    """Inverse of :meth:`SamplingSpec.to_kwargs` (lists back to tuples, logit_bias back to pairs)."""
    fields = {f.name for f in dataclasses.fields(SamplingSpec)}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(f"unknown sampling parameters {unknown}")
    values: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key == "logit_bias":
            value = tuple((int(t), float(b)) for t, b in dict(value).items())
        elif isinstance(value, list):
            value = tuple(value)
        values[key] = value
    return SamplingSpec(**values)


# -- tensors ------------------------------------------------------------------------------------------


def _offsets(lengths: Sequence[int]) -> list[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def encode_case(case: GoldenCase) -> bytes:
    """The safetensors bytes of one case (ids int32, values float32)."""
    import torch
    from safetensors.torch import save

    k = max((len(t) for seq in case.topk for t in seq), default=0)
    k = max(k, 1)
    flat_top = [t for seq in case.topk for t in seq]
    topk_ids = torch.full((len(flat_top), k), -1, dtype=torch.int32)
    topk_lp = torch.full((len(flat_top), k), float("-inf"), dtype=torch.float32)
    for row, entries in enumerate(flat_top):
        for col, (tok, val) in enumerate(sorted(entries.items(), key=lambda kv: -kv[1])[:k]):
            topk_ids[row, col] = tok
            topk_lp[row, col] = val
    tensors = {
        "prompt_ids": torch.tensor([t for p in case.prompts for t in p], dtype=torch.int32),
        "prompt_offsets": torch.tensor(_offsets([len(p) for p in case.prompts]), dtype=torch.int32),
        "completion_ids": torch.tensor([t for c in case.completions for t in c], dtype=torch.int32),
        "completion_offsets": torch.tensor(_offsets([len(c) for c in case.completions]), dtype=torch.int32),
        "sampled_logprobs": torch.tensor([v for s in case.sampled for v in s], dtype=torch.float32),
        "topk_ids": topk_ids,
        "topk_logprobs": topk_lp,
    }
    meta = {"format": str(FORMAT_VERSION), "sampling": json.dumps(case.spec.to_kwargs(), sort_keys=True)}
    return save(tensors, metadata=meta)


def decode_case(data: bytes, where: str) -> GoldenCase:
    """Parse :func:`encode_case` bytes; any malformation is a :class:`GoldenError` naming ``where``."""
    from safetensors.torch import load

    try:
        t = load(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
        spec = spec_from_kwargs(json.loads(meta["sampling"]))
        p_off, c_off = t["prompt_offsets"].tolist(), t["completion_offsets"].tolist()
        p_ids, c_ids = t["prompt_ids"].tolist(), t["completion_ids"].tolist()
        sampled = t["sampled_logprobs"].tolist()
        top_ids, top_lp = t["topk_ids"].tolist(), t["topk_logprobs"].tolist()
    except Exception as exc:  # noqa: BLE001 - any parse problem is one line naming the file
        raise GoldenError(f"{where}: not a readable golden file ({type(exc).__name__}: {str(exc)[:120]})") from None
    if len(p_off) != len(c_off) or c_off[-1] != len(c_ids) or len(sampled) != len(c_ids) or len(top_ids) != len(c_ids):
        raise GoldenError(f"{where}: inconsistent tensor shapes (offsets do not match the token arrays)")
    prompts, completions, values, tops = [], [], [], []
    for i in range(len(p_off) - 1):
        prompts.append(tuple(p_ids[p_off[i] : p_off[i + 1]]))
        completions.append(c_ids[c_off[i] : c_off[i + 1]])
        values.append(sampled[c_off[i] : c_off[i + 1]])
        tops.append(
            [{tok: val for tok, val in zip(top_ids[j], top_lp[j]) if tok >= 0} for j in range(c_off[i], c_off[i + 1])]
        )
    return GoldenCase(spec, prompts, completions, values, tops)


# -- manifest -----------------------------------------------------------------------------------------


@dataclass
class GoldenStore:
    """A golden directory: reads and atomically writes entries and the manifest."""

    root: Path

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def manifest(self) -> dict[str, Any]:
        """The parsed manifest (an empty one when the file does not exist)."""
        path = self.manifest_path
        if not path.is_file():
            return {"format": FORMAT_VERSION, "entries": {}}
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise GoldenError(f"{path}: not a readable golden manifest ({exc})") from None
        if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
            raise GoldenError(f"{path}: not a golden manifest (no 'entries' table)")
        if data.get("format") != FORMAT_VERSION:
            raise GoldenError(
                f"{path}: golden format {data.get('format')!r}, this kit reads format {FORMAT_VERSION} "
                f"(re-record with `{RECORD_COMMAND}`)"
            )
        return data

    def entries_for(self, model: str, cell: str) -> dict[str, dict[str, Any]]:
        """Manifest entries of one (model, cell), by case name."""
        prefix = f"{model}/{cell}/"
        return {k[len(prefix) :]: v for k, v in self.manifest()["entries"].items() if k.startswith(prefix)}

    def write(self, model: str, cell: str, case_name: str, case: GoldenCase, info: Mapping[str, Any]) -> Path:
        """Write one case's file, then its manifest entry (``info`` plus the file's hash); both atomic."""
        path = file_for(self.root, model, cell, case_name)
        data = encode_case(case)
        atomic_write_bytes(path, data)
        with self._manifest_lock():  # pytest-xdist workers record cells side by side into one manifest
            manifest = self.manifest()
            manifest["entries"][entry_key(model, cell, case_name)] = self._entry(path, data, case, case_name, info)
            manifest["entries"] = dict(sorted(manifest["entries"].items()))
            atomic_write_bytes(self.manifest_path, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
        return path

    @contextlib.contextmanager
    def _manifest_lock(self) -> Iterator[None]:
        """An exclusive lock on ``<root>/.manifest.lock`` around the manifest's read-modify-write."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".manifest.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _entry(
        self, path: Path, data: bytes, case: GoldenCase, case_name: str, info: Mapping[str, Any]
    ) -> dict[str, Any]:
        return {
            **info,
            "file": path.relative_to(self.root).as_posix(),
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
            "case": case_name,
            "sampling": case.spec.to_kwargs(),
        }

    def read(
        self, model: str, cell: str, case_name: str, expect: Mapping[str, Any]
    ) -> tuple[GoldenCase, dict[str, Any]]:
        """Load one entry, checking it exists, its hash, and that ``expect``'s keys equal the entry's.

        ``expect`` holds what must not change between record and verify (model hash, cell dtype and
        mode ...); a difference is an *incompatible* golden. Returns the case and its manifest entry.
        """
        key = entry_key(model, cell, case_name)
        entry = self.manifest()["entries"].get(key)
        path = file_for(self.root, model, cell, case_name)
        if entry is None:
            raise GoldenError(f"{path}: no manifest entry {key!r} in {self.manifest_path}")
        path = self.root / entry["file"]
        if not path.is_file():
            raise GoldenError(f"{path}: golden file missing (listed in {self.manifest_path})")
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry.get("sha256"):
            raise GoldenError(
                f"{path}: corrupt golden file: SHA-256 {digest[:12]}… differs from the manifest's "
                f"{str(entry.get('sha256'))[:12]}…"
            )
        for name, value in expect.items():
            if entry.get(name) != value:
                raise GoldenError(
                    f"{path}: incompatible golden: {name} was {entry.get(name)!r} when recorded, now {value!r} "
                    f"(re-record with `{RECORD_COMMAND}`)"
                )
        return decode_case(data, str(path)), entry
