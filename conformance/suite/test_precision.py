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

import dataclasses
import math
from typing import Any

import numpy as np
import pytest

from conformance.engines.base import EngineFailure, Request
from conformance.matrix import Cell
from conformance.spec import SamplingSpec

pytestmark = [pytest.mark.parity, pytest.mark.family("precision")]

ALPHA = 1e-3
SEQUENCES = 12


def _pairs(cells: list[Cell]) -> list[tuple[Cell, Cell]]:
    """(low-precision head, fp32 head) cells of the precision family whose engines differ only in head_dtype."""
    runs = [c for c in cells if c.runs("precision")]
    out = []
    for head32 in runs:
        if head32.head_dtype != "float32" or head32.dtype == "float32":
            continue
        key = dataclasses.replace(head32, head_dtype=None).engine_key()
        out += [(low, head32) for low in runs if low.head_dtype is None and low.engine_key() == key]
    return out


def _fp32_twins(cells: list[Cell], low: Cell) -> list[Cell]:
    """The fp32 cell whose engine differs from ``low`` only in dtype: the exact row of the mismatch table."""
    key = dataclasses.replace(low, dtype="float32").engine_key()
    return [c for c in cells if c.engine_key() == key][:1]


def _raw_errors(cell: Cell, session: Any, handle: Any = None) -> np.ndarray:
    """|Δ| of raw next-token logprobs (prompt_logprobs) over the fixed sequences, for one cell's engine
    (the session's pooled one, or ``handle``)."""
    path = session.model_path(cell)
    reference, prompts = session.reference(path), session.prompts(path)
    handle = handle if handle is not None else session.shared_handle(cell)
    sequences = [p for p in prompts.ids if len(p) > 8][:SEQUENCES]
    spec = SamplingSpec(temperature=0.0, max_tokens=1)
    out = handle.engine.generate([Request(seq, spec, prompt_logprobs=1) for seq in sequences])
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
    line = (
        f"{low.id}: mean|Δ| {e_low.mean():.4f} max {e_low.max():.3f} | {head32.id}: mean|Δ| "
        f"{e_head.mean():.4f} max {e_head.max():.3f} | head32 closer on {better}, farther on {worse}, "
        f"tied {len(e_low) - better - worse} of {len(e_low)} tokens; sign test p = {p:.2g}"
    )
    return line, p < ALPHA and e_head.mean() < e_low.mean()


def precision_engines(selected: list[Cell], own: list[Cell]) -> list[Cell]:
    """The cells :func:`test_fp32_head_reduces_mismatch` drives: every precision pair and its fp32 twin."""
    return [c for low, head32 in _pairs(selected) for c in (low, head32, *_fp32_twins(selected, low))]


@pytest.mark.parity_engines.with_args(precision_engines)
def test_fp32_head_reduces_mismatch(parity_config: Any, parity_session: Any) -> None:
    pairs = _pairs(parity_config.selected_cells())
    if not pairs:
        pytest.skip("the selected matrix has no pair of precision cells that differ only in head_dtype=float32")
    import torch

    if any(c.tier == "gpu" for pair in pairs for c in pair) and not torch.cuda.is_available():
        pytest.skip("GPU cells and torch.cuda.is_available() is False")
    lines, failures, engine_failures = [], [], []
    for low, head32 in pairs:
        try:
            line, passed = compare_heads(low, head32, parity_session)
            lines.append(line)
            if not passed:
                failures.append(line)
            for exact in _fp32_twins(parity_config.selected_cells(), low):
                errors = _raw_errors(exact, parity_session)
                lines.append(f"{exact.id}: mean|Δ| {errors.mean():.2g} max {errors.max():.2g} (same tokens)")
        except EngineFailure as exc:  # a cell that cannot start fails its own pair only, and at once
            engine_failures.append(f"{low.id} vs {head32.id}: ENGINE FAILURE [layer: engine]: {exc.reason}")
    print("\n".join(lines + engine_failures))
    assert not failures and not engine_failures, (
        "precision FAILED [layer: inference-path]: the fp32 lm_head does not reduce the mismatch "
        f"(one-sided sign test, α = {ALPHA}):\n  " + "\n  ".join(failures + engine_failures)
    )


MULT_PROB_GATES = {"bfloat16": 1.043, "float16": 1.043, "fp8": 1.08}
"""NeMo-RL's token_mult_prob_error gates (mean exp|Δ|): 1.043 for bf16 rollouts, 1.08 for FP8 ones."""


def test_mismatch_is_measured(cell: Cell, parity_session: Any) -> None:
    """Every precision cell's mismatch against the fp32 reference on the same fixed tokens (raw prompt
    logprobs), printed, and held to the RL health gate of its rollout precision (NeMo-RL's
    token_mult_prob_error; an FP8 rollout is measured here, not hidden by a loosened tolerance)."""
    errors = _raw_errors(cell, parity_session)
    mult = float(np.exp(errors).mean())
    precision = "fp8" if "fp8" in str(cell.extra_engine_kwargs.get("quantization", "")) else cell.dtype
    gate = MULT_PROB_GATES.get(precision)
    print(
        f"{cell.id} ({precision}): mean|Δ| {errors.mean():.4g} max|Δ| {errors.max():.4g} "
        f"token_mult_prob_error {mult:.4f} over {errors.size} tokens" + (f" (gate {gate})" if gate else "")
    )
    if gate is None:
        pytest.skip(f"cell {cell.id}: {precision} has no published health gate; measured mean|Δ| {errors.mean():.3g}")
    assert mult <= gate, (
        f"precision FAILED [layer: inference-path] in cell {cell.id!r}: token_mult_prob_error {mult:.4f} > "
        f"{gate} (NeMo-RL's gate for {precision} rollouts); mean|Δ| {errors.mean():.3g} max|Δ| {errors.max():.3g}"
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
