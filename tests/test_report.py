"""The per-cell summary table aggregates checks correctly (synthetic reports, no engine)."""

from __future__ import annotations

import math

import numpy as np
import torch

from conformance.contract import processed_distribution
from conformance.engines.base import Sample
from conformance.parity import ParityReport, SequenceInput, check_parity
from conformance.report.cells import cell_rows, summary_table
from conformance.report.recorder import EngineFailureRecord, Recorder
from conformance.spec import SamplingSpec, TokenContext
from conformance.tolerances import DEFAULT_TOLERANCES


def _report(cell: str, noise: float) -> ParityReport:
    gen = torch.Generator().manual_seed(0)
    raw = torch.randn(6, 32, generator=gen) * 3
    spec = SamplingSpec(temperature=0.7, max_tokens=6)
    out = [int(t) for t in torch.argmax(raw, dim=-1)]
    dist = processed_distribution(raw, out, spec, TokenContext((0, 1)))
    values = [float(dist.logprobs[i, t]) + noise for i, t in enumerate(out)]
    sample = Sample((0, 1), out, list(values), [{t: v} for t, v in zip(out, values)])
    return check_parity(
        [SequenceInput(sample, raw, TokenContext((0, 1)))],
        spec,
        "processed_logprobs",
        DEFAULT_TOLERANCES["cpu-float32"],
        cell,
    )


def test_table_aggregates_per_cell_and_lists_engine_failures() -> None:
    recorder = Recorder()
    recorder.add("t", _report("a", 0.0))
    recorder.add("t", _report("a", 0.0))
    recorder.add("t", _report("b", 1e-3))
    recorder.add_failure("t", EngineFailureRecord("b", "params", "engine died", "", known="some-finding"))
    rows = {r["cell"]: r for r in cell_rows(recorder.records, recorder.failure_records)}
    assert rows["a"]["checks"] == 2 and rows["a"]["failed"] == 0 and rows["a"]["tokens"] == 12
    # 6 tokens: below the bias test's 8, so the offset is an inference-path failure, not a semantic one
    assert rows["b"]["failed"] == 1 and rows["b"]["layers"] == "inference-path" and rows["b"]["engine fails"] == 1
    # 1e-3 off against a bound of 1e-4 / 0.7 (T=0.7 scales the fp32 bound): 7x the tolerance
    assert math.isclose(rows["b"]["tol used"], 1e-3 / (1e-4 / 0.7), rel_tol=1e-3)
    assert rows["a"]["tol used"] < 1
    assert np.isclose(rows["b"]["meanΔ"], -1e-3, rtol=1e-3)
    # the RL frameworks' diagnostics of the same tokens: NeMo-RL's mean exp|Δ| with every |Δ| = 1e-3
    assert np.isclose(rows["b"]["NeMo mult"], math.exp(1e-3), rtol=1e-6) and rows["a"]["NeMo mult"] == 1.0
    assert rows["b"]["TRL>cap"] == 0.0 and np.isclose(rows["b"]["IS ESS"], 1.0, atol=1e-6)
    table = summary_table(recorder)
    assert table.splitlines()[0].startswith("| cell") and "tol used" in table.splitlines()[0]
    assert "known engine finding some-finding in b: engine died (params: params)" in table
