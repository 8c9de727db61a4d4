"""Self-test of the semantic layer on real engines: a raw-mode engine checked against a processed trainer
fails naming the semantic layer and the semantics it really has; matching modes pass."""

from __future__ import annotations

from typing import Any

import pytest

from conformance.spec import SamplingSpec
from conformance.strategies import Case

pytestmark = pytest.mark.selftest

T07 = SamplingSpec(temperature=0.7, max_tokens=16, logprobs=3, seed=1)
BATCH = (0, 3, 8, 12)


def test_raw_engine_against_processed_trainer_is_a_semantic_failure(make_runner: Any) -> None:
    report = make_runner("fp32-raw", trainer="processed").run(Case(BATCH, T07))
    assert not report.passed, report.explain()
    assert report.layer == "semantic", report.explain()
    assert "match 'raw_logprobs'" in report.explain()
    assert report.metrics.max_abs > 0.1 and report.alternatives["raw_logprobs"] < 1e-4


@pytest.mark.parametrize(
    ("cell_id", "trainer"),
    [("fp32-raw", "raw"), ("fp32-processed", "processed"), ("fp32-processed", None), ("fp32-raw", None)],
)
def test_agreeing_modes_pass(make_runner: Any, cell_id: str, trainer: str | None) -> None:
    report = make_runner(cell_id, trainer=trainer).run(Case(BATCH, T07))
    assert report.passed, report.explain()
    assert report.metrics.n >= 32


def test_temperature_only_trainer_with_top_p_is_an_objective_mismatch(make_runner: Any) -> None:
    spec = SamplingSpec(temperature=0.7, top_p=0.5, max_tokens=16, logprobs=3, seed=2)
    report = make_runner("fp32-processed", trainer="temperature-only").run(Case(BATCH, spec))
    assert not report.passed and report.layer == "objective", report.explain()
    assert "top_p=0.5" in report.explain()


def test_cli_reports_semantic_layer_for_raw_engine_and_processed_trainer(pytester: pytest.Pytester) -> None:
    """End to end through the installed plugin: the suite fails with the layer, the shrunk params and
    the reproduction hint."""
    result = pytester.runpytest_subprocess(
        "-p",
        "conformance.plugin",
        "--pyargs",
        "conformance.suite",
        "-m",
        "parity",
        "-k",
        "test_logprobs_match_contract",
        "--parity-cells",
        "fp32-raw",
        "--parity-trainer",
        "processed",
        "--parity-examples",
        "25",
        "-p",
        "no:cacheprovider",
    )
    out = result.stdout.str()
    result.assert_outcomes(failed=1)
    assert "FAILED [layer: semantic] in cell 'fp32-raw'" in out
    assert "match 'raw_logprobs'" in out
    assert "temperature=" in out  # the shrunk parameters name the temperature that breaks it
    assert "worst tokens" in out
