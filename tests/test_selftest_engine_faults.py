"""Fault-injection meta-tests with the fault *inside* the engine process (see tests/engine_faults.py).

One real engine per tier gets the wrappers once; each test switches the fault mode, runs the suite's own
check (``check_cases``: the machinery of ``test_logprobs_match_contract``, the batch property, the
chi-square sampling test) on fixed cases chosen to exercise the fault, and asserts that it fails naming
the right layer (and, for semantic faults, the semantics the values really have). The same check then
passes with the mode switched back to ``none`` on the same engine; the wrappers are removed at module end.

Issue classes: 1 (raw / temperature twice / no temperature), 2 (not renormalised, penalties missing from
the reported values), 3 (batch-dependent logits), 5 (bf16 logits or bf16 head in an fp32 cell),
6 (samples drawn from another distribution). Wrapper-based faults of classes 3 and 6 are in
test_selftest_faults.py; the map of everything is docs/detection.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import pytest
from hypothesis import Phase, settings
from hypothesis import strategies as st
from hypothesis.errors import FlakyFailure

from conformance.bundled import GPU_MATRIX
from conformance.matrix import load_matrix
from conformance.plugin.fixture import Parity, check_cases
from conformance.spec import SamplingSpec
from conformance.strategies import Case, Vocabulary, vocabulary_from_tokenizer
from tests import engine_faults

pytestmark = [pytest.mark.selftest, pytest.mark.usefixtures("one_torch_thread")]

BATCH = (0, 3, 8)
ONE = settings(max_examples=1, deadline=None, database=None, phases=[Phase.explicit, Phase.generate])
FEW = settings(max_examples=3, deadline=None, database=None, phases=[Phase.explicit, Phase.generate])
TIERS = {"cpu": "fp32-processed", "gpu": "gpu-fp32-processed"}
NO_VOCAB = cast(Vocabulary, None)
"""For the sampling test, which reads no vocabulary (it draws from the prompt set and the engine's top-n)."""


def _spec(**kwargs: Any) -> SamplingSpec:
    return SamplingSpec(max_tokens=12, logprobs=3, seed=1, **kwargs)


SEMANTIC_NAMES = {
    "raw-logprobs": ("raw_logprobs",),
    "temperature-twice": ("processed with temperature applied twice",),
    "temperature-none": ("processed without temperature",),
    # On kept tokens, log_softmax(logits / T) without renormalisation *is* the temperature-only value:
    # the sampled values cannot tell the two apart, and either name is the right diagnosis.
    "not-renormalised": ("processed, not renormalised after truncation", "temperature-only"),
    "penalties-unreported": ("processed without penalties/bias/masks",),
}

CASES: dict[str, tuple[str, list[SamplingSpec]]] = {
    # mode -> (layer the check must name, fixed specs that exercise the fault)
    "raw-logprobs": ("semantic", [_spec(temperature=0.7), _spec(temperature=0.8, top_p=0.9)]),
    "temperature-twice": ("semantic", [_spec(temperature=0.7), _spec(temperature=1.3, top_k=30)]),
    "temperature-none": ("semantic", [_spec(temperature=0.7, top_k=20), _spec(temperature=0.6, top_p=0.95)]),
    "not-renormalised": ("semantic", [_spec(temperature=0.7, top_k=5), _spec(temperature=0.9, top_p=0.6)]),
    "penalties-unreported": (
        "semantic",
        [
            _spec(temperature=0.7, top_k=20, repetition_penalty=1.5, presence_penalty=0.5),
            _spec(temperature=0.7, top_k=20, frequency_penalty=0.8),
            _spec(temperature=0.7, top_k=20, logit_bias=((13, 3.0), (29, 3.0), (871, 3.0), (268, 2.0))),
        ],
    ),
    # Sampled (not greedy) cases: at T=0 a bf16 rounding that flips an argmax is reported as the semantic
    # "greedy token is not the argmax" violation before the numeric check (see docs/detection.md).
    "bf16-logits": ("inference-path", [_spec(temperature=1.0), _spec(temperature=0.7, top_k=20)]),
    "bf16-head": ("inference-path", [_spec(temperature=1.0), _spec(temperature=0.7, top_k=20)]),
}


@pytest.fixture(scope="module", params=sorted(TIERS))
def planted(request: pytest.FixtureRequest, make_runner: Any, kit_session: Any) -> Iterator[tuple[Any, Any]]:
    """(runner on the tier's fp32 processed cell, set_mode); the wrappers are removed afterwards."""
    tier = request.param
    if tier == "gpu":
        import torch

        if not torch.cuda.is_available():
            pytest.skip("GPU variant: torch.cuda.is_available() is False")
        gpu = {c.id: c for c in load_matrix(GPU_MATRIX)}[TIERS["gpu"]]
        handle = kit_session.handle(gpu)
        runner = make_runner(TIERS["cpu"], handle=handle)
    else:
        handle, runner = None, make_runner(TIERS["cpu"])
    llm = runner.handle.engine.llm
    with engine_faults.planted(llm) as set_mode:
        yield runner, set_mode
    if handle is not None:
        handle.close()


def _check(runner: Any, spec: SamplingSpec) -> None:
    """The suite's property machinery on one fixed case."""
    check_cases(runner, st.just(Case(BATCH, spec)), ONE, "engine-fault meta-test")


@pytest.mark.parametrize("mode", sorted(CASES))
def test_suite_check_catches_engine_fault(planted: tuple[Any, Any], mode: str) -> None:
    runner, set_mode = planted
    layer, specs = CASES[mode]
    set_mode(mode)
    try:
        for spec in specs:
            with pytest.raises(AssertionError) as info:
                _check(runner, spec)
            message = str(info.value)
            assert f"FAILED [layer: {layer}]" in message, message
            if mode in SEMANTIC_NAMES:
                assert any(f"match {name!r}" in message for name in SEMANTIC_NAMES[mode]), message
    finally:
        set_mode("none")
    for spec in specs:
        _check(runner, spec)


def test_batch_property_catches_batch_dependent_logits(
    planted: tuple[Any, Any], bundled_tokenizer: Any, bundled_reference: Any
) -> None:
    """Logits perturbed only when a step holds several sequences: the batch property fails."""
    from conformance.suite import test_inference_path as path_tests

    runner, set_mode = planted
    vocab = vocabulary_from_tokenizer(bundled_tokenizer, bundled_reference.vocab_size)
    set_mode("batch-noise")
    try:
        # FlakyFailure: the fault fired, but hypothesis's replay did not put both requests in one engine step
        # (the engine core may start a step before the second request arrives); its inner error is the check's.
        with pytest.raises((AssertionError, FlakyFailure)) as info:
            path_tests.test_batch_composition_does_not_change_logprobs(Parity(runner, FEW, vocab, "selftest"))
    finally:
        set_mode("none")
    caught = info.value.exceptions[0] if isinstance(info.value, FlakyFailure) else info.value
    assert "[layer: inference-path]" in str(caught), str(caught)
    path_tests.test_batch_composition_does_not_change_logprobs(Parity(runner, FEW, vocab, "selftest"))


def test_sampling_check_catches_a_sampler_drawing_elsewhere(planted: tuple[Any, Any]) -> None:
    """Draws from sharpened logits, correct reported values: the chi-square test fails (semantic)."""
    from conformance.suite import test_distribution

    runner, set_mode = planted
    set_mode("samples-elsewhere")
    try:
        with pytest.raises(AssertionError) as info:
            test_distribution.test_sampling_follows_reported_probabilities(Parity(runner, FEW, NO_VOCAB, "selftest"))
    finally:
        set_mode("none")
    message = str(info.value)
    assert "sampling FAILED [layer: semantic]" in message and "chi-square" in message, message
    test_distribution.test_sampling_follows_reported_probabilities(Parity(runner, FEW, NO_VOCAB, "selftest"))
