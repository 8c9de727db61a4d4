"""Precision layer: quantify each cell's mismatch on the same token sequences, and check that an fp32
lm_head reduces it relative to the low-precision head.

Every cell of the matrix (one engine at a time) scores the same fixed sequences teacher-forced through
``prompt_logprobs`` (raw, T=1), so each cell's |Δ| against the fp32 reference is measured on identical
tokens. For a pair of cells that differ only in ``head_dtype``, a one-sided exact sign test over the
paired tokens asks whether the fp32 head is closer to the reference on more tokens than it is farther.
The test fails unless that holds at α = 1e-3 and the mean |Δ| drops: an engine that ignores
``head_dtype`` (identical errors: all ties) or makes things worse fails; a real improvement passes, and
a clean engine whose fp32 head helps is wrongly failed only when its advantage is too small to show on
the fixed token set (the counts are in the message).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from conformance.engines.base import Request
from conformance.matrix import Cell
from conformance.spec import SamplingSpec

pytestmark = [pytest.mark.parity, pytest.mark.family("precision")]

ALPHA = 1e-3
SEQUENCES = 12


def _pairs(cells: list[Cell]) -> list[tuple[Cell, Cell]]:
    out = []
    for head32 in cells:
        if head32.head_dtype != "float32" or head32.dtype == "float32":
            continue
        for low in cells:
            if (low.head_dtype is None and low.dtype == head32.dtype and low.tier == head32.tier
                    and low.model == head32.model and low.logprobs_mode == head32.logprobs_mode):
                out.append((low, head32))
    return out


def _fp32_twins(cells: list[Cell], low: Cell) -> list[Cell]:
    """fp32 cells on the same model, tier and mode: the exact row of the per-cell mismatch table."""
    return [c for c in cells if c.dtype == "float32" and c.model == low.model and c.tier == low.tier
            and c.logprobs_mode == low.logprobs_mode and c.families is None][:1]


def _raw_errors(cell: Cell, session: Any, handle: Any = None) -> np.ndarray:
    """|Δ| of raw next-token logprobs (prompt_logprobs) over the fixed sequences, for one cell's engine
    (a fresh one from ``session``, or ``handle``), closed afterwards."""
    path = session.model_path(cell)
    reference, prompts = session.reference(path), session.prompts(path)
    handle = handle if handle is not None else session.handle(cell)
    try:
        sequences = [p for p in prompts.ids if len(p) > 8][:SEQUENCES]
        spec = SamplingSpec(temperature=0.0, max_tokens=1)
        out = handle.engine.generate([Request(seq, spec, prompt_logprobs=1) for seq in sequences])
    finally:
        handle.close()
    logits = reference.raw_logits([(seq[:1], seq[1:]) for seq in sequences])
    errors = []
    for seq, group, raw in zip(sequences, out, logits):
        ref = raw.log_softmax(dim=-1)
        values = group[0].prompt_values
        for pos in range(1, len(seq)):
            engine_value = values[pos][seq[pos]] if values[pos] is not None else math.nan
            errors.append(abs(float(ref[pos - 1, seq[pos]]) - engine_value))
    return np.array(errors)


def sign_test_p(better: int, worse: int) -> float:
    """One-sided exact binomial p-value of ``better`` successes in ``better + worse`` fair trials."""
    n = better + worse
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(better, n + 1)) / (1 << n)  # exact big-int division


def compare_heads(low: Cell, head32: Cell, session: Any, head32_handle: Any = None) -> tuple[str, bool]:
    """Score both cells on the same sequences; (summary line, whether the fp32 head is better at α)."""
    e_low = _raw_errors(low, session)
    e_head = _raw_errors(head32, session, head32_handle)
    better = int((e_head < e_low).sum())
    worse = int((e_head > e_low).sum())
    p = sign_test_p(better, worse)
    line = (f"{low.id}: mean|Δ| {e_low.mean():.4f} max {e_low.max():.3f} | {head32.id}: mean|Δ| "
            f"{e_head.mean():.4f} max {e_head.max():.3f} | head32 closer on {better}, farther on {worse}, "
            f"tied {len(e_low) - better - worse} of {len(e_low)} tokens; sign test p = {p:.2g}")
    return line, p < ALPHA and e_head.mean() < e_low.mean()


def test_fp32_head_reduces_mismatch(parity_config: Any, parity_session: Any) -> None:
    pairs = _pairs(parity_config.selected_cells())
    if not pairs:
        pytest.skip("the selected matrix has no pair of cells that differ only in head_dtype=float32")
    import torch

    if any(c.tier == "gpu" for pair in pairs for c in pair) and not torch.cuda.is_available():
        pytest.skip("GPU cells and torch.cuda.is_available() is False")
    lines = []
    failures = []
    for low, head32 in pairs:
        line, passed = compare_heads(low, head32, parity_session)
        lines.append(line)
        if not passed:
            failures.append(line)
        for exact in _fp32_twins(parity_config.selected_cells(), low):
            errors = _raw_errors(exact, parity_session)
            lines.append(f"{exact.id}: mean|Δ| {errors.mean():.2g} max {errors.max():.2g} (same tokens)")
    print("\n".join(lines))
    assert not failures, (
        "precision FAILED [layer: inference-path]: the fp32 lm_head does not reduce the mismatch "
        f"(one-sided sign test, α = {ALPHA}):\n  " + "\n  ".join(failures)
    )


def engine_head_dtype(cell: Cell) -> str:
    """The dtype of the engine's lm_head in this cell (``head_dtype`` override, else the model dtype)."""
    return cell.head_dtype or cell.dtype


def test_head_precision_is_not_one_sided(cell: Cell, parity_config: Any) -> None:
    """With ``--parity-trainer-head`` declared: the engine's lm_head precision must equal the trainer's,
    or importance ratios carry a one-sided precision error (engine fp32 vs trainer bf16, or the reverse)."""
    declared = parity_config.trainer_head
    if declared is None:
        pytest.skip("declare your trainer's lm_head dtype with --parity-trainer-head to check one-sided precision")
    engine = engine_head_dtype(cell)
    assert engine == declared, (
        f"precision FAILED [layer: objective] in cell {cell.id!r}: one-sided precision: the engine's lm_head "
        f"runs in {engine} but the trainer's in {declared}; the logprob error of the lower-precision side is "
        f"not mirrored on the other (set head_dtype = {declared!r} in the cell, or match the trainer)"
    )
