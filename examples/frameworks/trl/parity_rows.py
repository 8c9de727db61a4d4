"""The example's matrix rows (framework_defaults.toml) and how one row is run against one cell.

A row is a set of sampling settings from the framework's config. Running it on a cell: 4 seeded requests
to the cell's engine; the kit's verdict (``conformance.assert_logprob_parity`` with this repo's trainer
function and the declared trainer semantics); and the framework's own numbers on the same samples (its
logprob function vs the engine's sampled values: the kit's metrics and the RL frameworks' IS
diagnostics, :mod:`conformance.rl_metrics`). ``PARITY_FRAMEWORK_RESULTS=path.jsonl`` appends one JSON
record per row and cell (docs/frameworks.md is built from them).
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from conformance import Request, SamplingSpec, assert_logprob_parity
from conformance.metrics import compute_metrics
from conformance.rl_metrics import rl_framework_metrics
from conformance.spec import trainer_semantics

HERE = Path(__file__).resolve().parent
DEFAULTS = tomllib.loads((HERE / "framework_defaults.toml").read_text())
ROWS: list[dict[str, Any]] = DEFAULTS["row"]
SPEC_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty")
PROMPTS = (0, 1, 2, 3)
MAX_TOKENS = 12

FrameworkLogps = Callable[[list[tuple[list[int], list[int]]], Path, float], Sequence[Any]]


def row_spec(row: dict[str, Any], seed: int = 0) -> SamplingSpec:
    """The row's sampling settings as the kit's SamplingSpec (4 prompts, 12 tokens, seeded, top-2)."""
    return SamplingSpec(**{k: row[k] for k in SPEC_KEYS if k in row}, max_tokens=MAX_TOKENS, seed=seed, logprobs=2)


@dataclass
class RowResult:
    row: str
    cell: str
    logprobs_mode: str
    spec: str
    declared: str
    verdict: str
    """``pass`` or the failing layer."""
    failure: str = ""
    kit_metrics: str = ""
    own: dict[str, float] = field(default_factory=dict)
    """The framework's own logprob function vs the engine's sampled values (kit metrics of that Δ)."""
    rl: dict[str, float] = field(default_factory=dict)
    rl_summary: str = ""
    own_logps: list[list[float]] = field(default_factory=list)
    """Per sequence, the framework's own logprob of each sampled token (so any IS mode can be recomputed)."""
    engine_logps: list[list[float]] = field(default_factory=list)


def _layer(text: str) -> str:
    found = re.search(r"\[layer: ([a-z-]+)\]", text)
    return found.group(1) if found else "error"


def run_row(
    row: dict[str, Any],
    runner: Any,
    model_path: Path,
    trainer_fn: Callable[..., Any],
    declared: str,
    framework_logps: FrameworkLogps,
    framework: str,
    version: str,
) -> RowResult:
    """Generate, judge with the kit, score with the framework's own function; record when asked."""
    spec = row_spec(row)
    requests = [Request(runner.prompts.ids[i], spec) for i in PROMPTS]
    engine = runner.handle.engine
    samples = engine.generate(requests)
    result = RowResult(row["id"], runner.cell.id, str(engine.logprobs_mode), spec.describe(), declared, "pass")
    try:
        report = assert_logprob_parity(
            engine,
            trainer_fn,
            requests,
            samples=samples,
            cell=runner.cell,
            trainer=trainer_semantics(declared),
            model_path=model_path,
        )
        result.kit_metrics = report.metrics.summary()
    except AssertionError as exc:
        text = str(exc)
        result.verdict, result.failure = _layer(text), text
        line = next((ln.strip() for ln in text.splitlines() if ln.strip().startswith("metrics over")), "")
        result.kit_metrics = line.split(": ", 1)[-1]
    flat = [s for group in samples for s in group]
    pairs = [(list(s.prompt_ids), list(s.output_ids)) for s in flat]
    ours = [np.asarray(v, dtype=np.float64) for v in framework_logps(pairs, model_path, spec.effective_temperature)]
    theirs = [np.array([np.nan if v is None else v for v in s.sampled_values], dtype=np.float64) for s in flat]
    m = compute_metrics(np.concatenate(ours), np.concatenate(theirs))
    result.own = {"n": m.n, "max_abs": m.max_abs, "mean_signed": m.mean_signed, "mean_abs": m.mean_abs, "k3": m.k3_kl}
    rl = rl_framework_metrics(ours, theirs)
    result.own_logps = [o.tolist() for o in ours]
    result.engine_logps = [t.tolist() for t in theirs]
    result.rl, result.rl_summary = rl.columns(), rl.summary()
    target = os.environ.get("PARITY_FRAMEWORK_RESULTS")
    if target:
        record = {"framework": framework, "framework_version": version, **result.__dict__}
        with open(target, "a") as fh:
            fh.write(json.dumps(record) + "\n")
    return result


def check_expectation(row: dict[str, Any], result: RowResult) -> None:
    """The kit's verdict is the one the row expects for this cell (and names the expected cause)."""
    expected = row["expect"][result.cell]
    detail = (
        f"row {row['id']!r} on cell {result.cell!r} ({row['why']})\n{result.failure}\nframework: {result.rl_summary}"
    )
    assert result.verdict == expected, f"expected {expected}, the kit said {result.verdict}: {detail}"
    pattern = row.get("match", {}).get(result.cell)
    if pattern:
        assert re.search(pattern, result.failure), f"failure text lacks {pattern!r}: {detail}"
