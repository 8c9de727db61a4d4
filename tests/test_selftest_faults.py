"""Fault-injection self-tests: each suite test family fails, naming the right layer, on an engine with
the fault it exists for, and passes on the same real engine without it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import Phase, settings

from conformance.engines.handle import EngineHandle
from conformance.plugin.fixture import Parity
from conformance.spec import SamplingSpec
from conformance.strategies import Case, vocabulary_from_tokenizer
from conformance.suite import test_inference_path as path_tests
from tests import faults

pytestmark = pytest.mark.selftest

CELL = "fp32-processed"
FEW = settings(max_examples=3, deadline=None, database=None, phases=[Phase.explicit, Phase.generate])
"""A planted fault must be caught by the first examples already (no shrinking needed); a clean engine
passes a few."""


@pytest.fixture(scope="module")
def vocab(bundled_tokenizer: Any, bundled_reference: Any) -> Any:
    return vocabulary_from_tokenizer(bundled_tokenizer, bundled_reference.vocab_size)


def _faulty(engines: Any, make_runner: Any, fault: faults.Fault | None) -> Any:
    real = engines(CELL)
    if fault is None:
        return make_runner(CELL)
    handle = EngineHandle(
        real.cell, real.model_path, factory=lambda cell, path: faults.FaultyEngine(real.engine, fault)
    )
    return make_runner(CELL, handle=handle)


def _parity(runner: Any, vocab: Any = None) -> Parity:
    """The suite's ``parity`` object over ``runner``, with a few examples and no example database."""
    return Parity(runner, FEW, vocab, "selftest")


def _expect_failure(layer: str, call: Any) -> str:
    with pytest.raises(AssertionError) as info:
        call()
    message = str(info.value)
    assert f"[layer: {layer}]" in message, message
    return message


FAMILIES: dict[str, tuple[faults.Fault, Callable[[Any, Any], None], str]] = {
    "prefix-cache": (
        faults.on_cache_hit(0.01),
        lambda runner, vocab: path_tests.test_prefix_cache_hit_matches_cold(_parity(runner, vocab)),
        "prefix-cache hit",
    ),
    "batch": (
        faults.when_batched(0.01),
        lambda runner, vocab: path_tests.test_batch_composition_does_not_change_logprobs(_parity(runner, vocab)),
        "in a batch of",
    ),
    "decode-vs-prefill": (
        faults.on_prefill_rescore(0.01),
        lambda runner, vocab: path_tests.test_decode_matches_prefill_rescore(_parity(runner, vocab), "block-boundary"),
        "prefill rescore",
    ),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_inference_path_family_catches_its_fault(engines: Any, make_runner: Any, vocab: Any, family: str) -> None:
    fault, run, path_name = FAMILIES[family]
    message = _expect_failure("inference-path", lambda: run(_faulty(engines, make_runner, fault), vocab))
    assert path_name in message


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_inference_path_family_passes_without_fault(engines: Any, make_runner: Any, vocab: Any, family: str) -> None:
    _, run, _ = FAMILIES[family]
    run(_faulty(engines, make_runner, None), vocab)


def test_off_by_one_reporting_is_caught(engines: Any, make_runner: Any) -> None:
    """Sampled values reported one position late: a semantic failure at T=0.7 that names the off-by-one."""
    runner = _faulty(engines, make_runner, faults.shifted_by_one_position())
    report = runner.run(Case((0, 3, 8), SamplingSpec(temperature=0.7, max_tokens=12, seed=3)))
    assert not report.passed and report.layer == "semantic", report.explain()
    assert "match 'processed, sampled-token values one position late'" in report.explain(), report.explain()
    assert report.metrics.max_abs > 0.1


def test_sampling_family_catches_a_sampler_drawing_elsewhere(engines: Any, make_runner: Any) -> None:
    from conformance.suite import test_distribution

    runner = _faulty(engines, make_runner, faults.samples_elsewhere())
    message = _expect_failure(
        "semantic", lambda: test_distribution.test_sampling_follows_reported_probabilities(_parity(runner))
    )
    assert "chi-square" in message
    test_distribution.test_sampling_follows_reported_probabilities(_parity(_faulty(engines, make_runner, None)))


def test_precision_family_catches_an_ignored_head_dtype(cpu_cells: Any, kit_session: Any) -> None:
    """A 'head32' engine that is really the bf16 engine (head_dtype ignored): identical errors, no gain."""
    from conformance.suite.test_precision import compare_heads

    low, head32 = cpu_cells["bf16-processed"], cpu_cells["bf16-processed-head32"]
    ignored = EngineHandle(
        head32, kit_session.model_path(), factory=lambda cell, path: kit_session.factory(low)(low, path)
    )
    try:
        line, passed = compare_heads(low, head32, kit_session, ignored)
    finally:
        ignored.close()
    assert not passed and "closer on 0, farther on 0" in line, line


def test_chunked_prefill_family_catches_its_fault(engines: Any, make_runner: Any) -> None:
    """Values off only for prompts whose prefill is split across steps (chunked cell, 64-token budget)."""
    real = engines("fp32-processed-chunked")
    fault = faults.on_long_prefill(0.01, real.engine.scheduler_budget())
    handle = EngineHandle(
        real.cell, real.model_path, factory=lambda cell, path: faults.FaultyEngine(real.engine, fault)
    )
    runner = make_runner("fp32-processed-chunked", handle=handle)
    _expect_failure("inference-path", lambda: path_tests.test_chunked_prefill_matches_reference(_parity(runner), False))
    path_tests.test_chunked_prefill_matches_reference(_parity(make_runner("fp32-processed-chunked")), False)


def test_one_sided_head_precision_is_flagged(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess(
        "-p",
        "conformance.plugin",
        "--pyargs",
        "conformance.suite",
        "-m",
        "parity",
        "-k",
        "one_sided",
        "--parity-cells",
        "bf16-processed,bf16-processed-head32",
        "--parity-trainer-head",
        "float32",
        "-p",
        "no:cacheprovider",
    )
    result.assert_outcomes(passed=1, failed=1)
    assert (
        "one-sided precision: the engine's lm_head runs in bfloat16 but the trainer's in float32" in result.stdout.str()
    )


def test_top_k_family_catches_a_distribution_gap(engines: Any, make_runner: Any) -> None:
    """Sampled token fine, the rest of the reported top-20 off by 0.01: caught, not just the sampled one."""
    from conformance.suite import test_distribution

    spec = SamplingSpec(temperature=1.0, max_tokens=8, logprobs=20, seed=11)
    runner = _faulty(engines, make_runner, faults.top_n_drift(0.01))
    message = _expect_failure(
        "inference-path", lambda: test_distribution.test_top_k_distribution_matches_reference(_parity(runner), spec)
    )
    assert "(top)" in message  # the worst tokens are top-n entries, not sampled ones
    test_distribution.test_top_k_distribution_matches_reference(_parity(_faulty(engines, make_runner, None)), spec)
