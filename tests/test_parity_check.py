"""check_parity on synthetic engine samples (no engine): clean samples pass, planted faults name their layer.

Samples are drawn from the contract itself over random fp32 logits, so an engine that returns the
contract's values is exactly conforming; each test then plants one fault in the returned values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from conformance import contract
from conformance.contract import ProcessedDistribution
from conformance.engines.base import Sample
from conformance.parity import ParityReport, SequenceInput, Target, check_parity
from conformance.spec import LogprobsMode, SamplingSpec, TokenContext
from conformance.tolerances import DEFAULT_TOLERANCES, Tolerance

FP32 = DEFAULT_TOLERANCES["cpu-float32"]
BF16 = DEFAULT_TOLERANCES["cpu-bfloat16"]
VOCAB = 48
EOS = VOCAB - 1


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(one_torch_thread: None) -> None:
    """Tiny tensors: see tests/conftest.py."""


ValueFn = Callable[[ProcessedDistribution, torch.Tensor, torch.Generator], torch.Tensor]


def processed(dist: ProcessedDistribution, raw: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return dist.logprobs


def build(
    spec: SamplingSpec,
    values: ValueFn = processed,
    *,
    band: float = FP32.band,
    sequences: int = 4,
    positions: int = 8,
    seed: int = 0,
    top_n: int = 3,
) -> list[SequenceInput]:
    """Sequences sampled from the contract; the engine reports ``values(dist, raw)`` for every token."""
    gen = torch.Generator().manual_seed(seed)
    out: list[SequenceInput] = []
    for _ in range(sequences):
        raw = torch.randn(positions, VOCAB, generator=gen) * 2.5
        prompt = tuple(torch.randint(0, VOCAB, (6,), generator=gen).tolist())
        context = TokenContext(prompt, frozenset({EOS}))
        ids: list[int] = []
        for i in range(positions):
            dist = contract.processed_distribution(raw[: i + 1], ids + [0], spec, context, band=band)
            if spec.greedy:
                token = int(dist.shaped[i].argmax())
            else:
                # only tokens that surely survive, so planted faults are the only problem
                probs = torch.where(dist.sure[i], dist.logprobs[i].exp(), torch.zeros(VOCAB))
                token = int(torch.multinomial(probs, 1, generator=gen))
            ids.append(token)
        dist = contract.processed_distribution(raw, ids, spec, context, band=band)
        engine = values(dist, raw, gen)
        sampled: list[float | None] = [float(engine[i, t]) for i, t in enumerate(ids)]
        tops = []
        for i in range(positions):
            top = torch.topk(engine[i], top_n).indices.tolist()
            tops.append({t: float(engine[i, t]) for t in {*top, ids[i]}})
        sample = Sample(prompt, ids, sampled, tops, finish_reason="length")
        out.append(SequenceInput(sample, raw, context))
    return out


def check(
    inputs: list[SequenceInput],
    spec: SamplingSpec,
    target: Target = "processed_logprobs",
    tolerance: Tolerance = FP32,
    **kw: Any,
) -> ParityReport:
    return check_parity(inputs, spec, target, tolerance, cell="fp32-processed", **kw)


def failed(report: ParityReport, layer: str) -> str:
    text = report.explain()
    assert not report.passed, text
    assert report.layer == layer, text
    return " | ".join(report.reasons)


SPECS = [
    SamplingSpec(temperature=0.7),
    SamplingSpec(temperature=1.0, top_p=0.8, top_k=20),
    SamplingSpec(temperature=0.6, min_p=0.05, repetition_penalty=1.3, presence_penalty=0.4),
    SamplingSpec(temperature=0.0, frequency_penalty=0.5, logit_bias=((3, 2.0),)),
    SamplingSpec(temperature=0.005, top_k=5),
    SamplingSpec(temperature=0.9, allowed_token_ids=tuple(range(0, VOCAB, 2)), min_tokens=4),
]


# ---- clean --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_clean_samples_pass(spec: SamplingSpec) -> None:
    report = check(build(spec), spec)
    assert report.passed, report.explain()
    assert report.layer is None and report.reasons == []
    assert report.metrics.n == 4 * 8
    assert report.metrics.max_abs == 0.0
    text = report.explain()
    assert "passed" in text and "FAILED" not in text


@pytest.mark.parametrize("mode", ["raw_logprobs", "raw_logits", "processed_logits"])
def test_clean_other_modes_pass(mode: LogprobsMode) -> None:
    spec = SamplingSpec(temperature=0.8, top_p=0.9)
    inputs = build(spec, lambda d, raw, g: contract.mode_values(d, raw, mode))
    report = check(inputs, spec, target=mode)
    assert report.passed, report.explain()


def test_bf16_sized_noise_passes_bf16_tolerance() -> None:
    spec = SamplingSpec(temperature=1.0)
    noisy = lambda d, raw, g: d.logprobs + torch.randn(d.logprobs.shape, generator=g) * 0.01
    report = check(build(spec, noisy, band=BF16.band), spec, tolerance=BF16)
    assert report.passed, report.explain()


# ---- planted faults -----------------------------------------------------------------------------------


def test_a_raw_logprobs_where_processed_expected() -> None:
    spec = SamplingSpec(temperature=0.7)
    inputs = build(spec, lambda d, raw, g: torch.log_softmax(raw, dim=-1))
    report = check(inputs, spec)
    why = failed(report, "semantic")
    assert "raw_logprobs" in why
    assert report.alternatives["raw_logprobs"] == pytest.approx(0.0, abs=1e-6)
    assert report.matched == "raw_logprobs" and report.variant is None


def test_b_not_renormalised_after_top_p() -> None:
    # Without shaping, log_softmax(z/T) over the kept tokens is also exactly the 'temperature-only' value
    # (and at T=1 the raw logprobs): a presence penalty makes "not renormalised" the only fitting meaning.
    spec = SamplingSpec(temperature=0.8, top_p=0.5, presence_penalty=0.7)
    inputs = build(spec, lambda d, raw, g: torch.log_softmax(d.scaled, dim=-1).masked_fill(~d.kept, -math.inf))
    report = check(inputs, spec)
    why = failed(report, "semantic")
    assert "not renormalised" in why
    assert report.metrics.mean_signed > 0  # expected (renormalised) is larger than the engine's


def test_c_small_noise_is_inference_path() -> None:
    spec = SamplingSpec(temperature=1.0, top_k=10)

    def noisy(d: ProcessedDistribution, raw: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return d.logprobs + torch.randn(d.logprobs.shape, generator=g) * 1e-3

    report = check(build(spec, noisy, sequences=6), spec)
    why = failed(report, "inference-path")
    assert "max |Δ|" in why
    assert "systematic" not in why and "match" not in why


def test_d_sampled_token_masked_by_top_k() -> None:
    spec = SamplingSpec(temperature=1.0, top_k=1)
    inputs = build(spec)
    sample, raw = inputs[0].sample, inputs[0].raw_logits
    # position 0 has an empty history: the argmax of the raw logits is the only survivor
    wrong = int(raw[0].argmin())
    sample.output_ids[0] = wrong
    sample.sampled_values[0] = float(torch.log_softmax(raw[0], dim=-1)[wrong])
    report = check(inputs, spec)
    why = failed(report, "semantic")
    assert "masked" in why and f"token {wrong}" in why


def test_e_missing_sampled_value() -> None:
    spec = SamplingSpec(temperature=0.7, top_p=0.9)
    inputs = build(spec)
    inputs[1].sample.sampled_values[3] = None
    report = check(inputs, spec)
    why = failed(report, "semantic")
    assert "no value returned" in why and "seq 1 pos 3" in why


def test_e_nan_values_fail() -> None:
    """NaN compares false with every bound: without an explicit check it would slip through the verdict."""
    spec = SamplingSpec(temperature=0.7)
    inputs = build(spec)
    inputs[0].sample.sampled_values[2] = float("nan")
    why = failed(check(inputs, spec), "semantic")
    assert "NaN for the sampled token" in why and "seq 0 pos 2" in why
    inputs = build(spec)
    token = next(t for t in inputs[1].sample.top_values[0] if t != inputs[1].sample.output_ids[0])
    inputs[1].sample.top_values[0][token] = float("nan")
    assert "NaN for top token" in failed(check(inputs, spec), "semantic")


def test_e_truncated_sampled_values() -> None:
    spec = SamplingSpec(temperature=0.7)
    inputs = build(spec)
    del inputs[0].sample.sampled_values[-2:]
    why = failed(check(inputs, spec), "semantic")
    assert "no value returned" in why


def test_f_temperature_only_trainer_with_top_p_is_objective() -> None:
    spec = SamplingSpec(temperature=0.7, top_p=0.5)
    inputs = build(spec)  # the engine returns exactly the processed logprobs
    report = check(inputs, spec, target="temperature-only", trainer_declared=True)
    why = failed(report, "objective")
    assert "top_p" in why and "no engine can match" in why


def test_f_undeclared_trainer_target_is_not_objective() -> None:
    spec = SamplingSpec(temperature=0.7, top_p=0.5)
    report = check(build(spec), spec, target="temperature-only", trainer_declared=False)
    assert not report.passed
    assert report.layer != "objective"


def test_f_temperature_only_trainer_without_truncation_passes() -> None:
    spec = SamplingSpec(temperature=0.7)
    report = check(build(spec), spec, target="temperature-only", trainer_declared=True)
    assert report.passed, report.explain()


def test_greedy_token_not_argmax() -> None:
    spec = SamplingSpec(temperature=0.0)
    inputs = build(spec)
    sample, raw = inputs[2].sample, inputs[2].raw_logits
    wrong = int(raw[0].argmin())
    sample.output_ids[0] = wrong
    sample.sampled_values[0] = float(torch.log_softmax(raw[0], dim=-1)[wrong])
    why = failed(check(inputs, spec), "semantic")
    assert "not the argmax" in why


def test_constant_offset_is_semantic() -> None:
    spec = SamplingSpec(temperature=1.0)
    report = check(build(spec, lambda d, raw, g: d.logprobs - 0.05), spec)
    why = failed(report, "semantic")
    assert "systematic offset" in why


# ---- explain ------------------------------------------------------------------------------------------


def test_g_explain() -> None:
    spec = SamplingSpec(temperature=0.7, top_p=0.9)
    clean = check(build(spec), spec, engine_description="synthetic engine")
    assert clean.passed
    text = clean.explain()
    assert "passed" in text and "'fp32-processed'" in text and "synthetic engine" in text

    bad_spec = SamplingSpec(temperature=0.7)
    bad = check(build(bad_spec, lambda d, raw, g: torch.log_softmax(raw, dim=-1)), bad_spec, decode=lambda t: f"<{t}>")
    text = bad.explain()
    assert "FAILED [layer: semantic]" in text
    assert "fp32-processed" in text
    assert "params:" in text and "temperature=0.7" in text
    assert "worst tokens" in text and "<" in text  # decoded token text
    assert "metrics over 4 sequences:" in text and bad.metrics.summary() in text
    assert "why:" in text and "raw_logprobs" in text
    record = bad.as_record()
    assert record["layer"] == "semantic" and record["passed"] is False
    assert record["params"] == {"temperature": 0.7}
    assert isinstance(record["worst"], list) and len(record["worst"]) == 5


def test_report_is_independent_of_sample_order() -> None:
    spec = SamplingSpec(temperature=0.7, top_k=12)
    inputs = build(spec, lambda d, raw, g: torch.log_softmax(raw, dim=-1))
    a = check(inputs, spec)
    b = check(list(reversed(inputs)), spec)
    assert (a.passed, a.layer) == (b.passed, b.layer)
    assert a.metrics.mean_abs == pytest.approx(b.metrics.mean_abs)


def test_helper_samples_only_surviving_tokens() -> None:
    # guard for the helper itself: samples never include a token outside the contract's surviving set
    spec = SamplingSpec(temperature=1.0, top_k=3, top_p=0.7)
    for seq in build(spec):
        dist = contract.processed_distribution(seq.raw_logits, seq.sample.output_ids, spec, seq.context)
        for i, t in enumerate(seq.sample.output_ids):
            assert bool(dist.kept[i, t])


# ---- step-order variants ------------------------------------------------------------------------------


def _reported(inputs: list[SequenceInput], table: Callable[[SequenceInput], torch.Tensor]) -> list[SequenceInput]:
    """The same samples with every returned value (sampled and top-n) taken from ``table(seq)``."""
    out = []
    for seq in inputs:
        values = table(seq)
        sample = seq.sample
        sampled: list[float | None] = [float(values[i, t]) for i, t in enumerate(sample.output_ids)]
        tops = [{t: float(values[i, t]) for t in top} for i, top in enumerate(sample.top_values)]
        out.append(
            SequenceInput(
                Sample(sample.prompt_ids, sample.output_ids, sampled, tops, "length"), seq.raw_logits, seq.context
            )
        )
    return out


@pytest.mark.parametrize(
    ("name", "spec"),
    [
        ("top_p before min_p", SamplingSpec(temperature=0.9, top_p=0.6, min_p=0.1, top_k=12)),
        ("top_p before top_k", SamplingSpec(temperature=1.2, top_p=0.7, top_k=4)),
        ("repetition penalty over output only", SamplingSpec(temperature=0.8, repetition_penalty=1.8)),
        ("temperature before bias/penalties", SamplingSpec(temperature=0.5, frequency_penalty=0.9)),
    ],
)
def test_values_of_a_step_order_variant_name_it(name: str, spec: SamplingSpec) -> None:
    variant = contract.VARIANTS[name]
    inputs = _reported(
        build(spec, sequences=6), lambda s: variant.fn(s.raw_logits, s.sample.output_ids, spec, s.context)
    )
    report = check(inputs, spec)
    why = failed(report, "semantic")
    assert report.variant == report.matched == name, report.explain()
    assert f"step-order variant {name!r} ({variant.description}" in why and f"step {variant.step}" in why
    assert report.alternatives[name] <= 1e-5
    assert report.as_record()["variant"] == name
    assert "under each step-order variant active here" in report.explain()


def test_a_variant_indistinguishable_from_another_lists_both() -> None:
    # without top_k, "top_p first" reads exactly like "top_p before min_p": the registry's first is named
    spec = SamplingSpec(temperature=0.9, top_p=0.6, min_p=0.1)
    variant = contract.VARIANTS["top_p first"]
    inputs = _reported(
        build(spec, sequences=6), lambda s: variant.fn(s.raw_logits, s.sample.output_ids, spec, s.context)
    )
    report = check(inputs, spec)
    failed(report, "semantic")
    assert report.variant == "top_p before min_p"
    assert "top_p first" in report.variant_ties
    assert "indistinguishable here: 'top_p first'" in report.explain()


def test_clean_samples_evaluate_no_variant_and_noise_names_none() -> None:
    spec = SamplingSpec(temperature=0.9, top_p=0.6, min_p=0.1)
    clean = check(build(spec), spec)
    assert clean.passed and clean.alternatives == {} and clean.variant is None
    noisy = lambda d, raw, g: d.logprobs + torch.randn(d.logprobs.shape, generator=g) * 1e-3
    report = check(build(spec, noisy, sequences=6), spec)
    failed(report, "inference-path")
    assert report.variant is None and "top_p before min_p" in report.alternatives


def test_a_token_only_the_variant_keeps_names_the_variant() -> None:
    """The engine sampled a token the contract masks (probs 0.5/0.3/0.15/0.05, min_p 0.2, top_p 0.82: the
    contract keeps the first two, top-p before min_p the first three) and reports the variant's values:
    the masked token's own value is what identifies the variant."""
    raw = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    spec = SamplingSpec(top_p=0.82, min_p=0.2)
    values = {0: math.log(0.5 / 0.95), 2: math.log(0.15 / 0.95)}
    sample = Sample((1,), [2], [values[2]], [values], finish_reason="length")
    report = check([SequenceInput(sample, raw, TokenContext((1,)))], spec)
    why = failed(report, "semantic")
    assert "sampled token 2 is masked by the contract" in why
    assert report.variant == "top_p before min_p", report.explain()
    assert report.alternatives["processed_logprobs"] == math.inf


# ---- probabilities fp32 cannot hold -------------------------------------------------------------------


def _minus_inf_below(threshold: float) -> ValueFn:
    def values(d: ProcessedDistribution, raw: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return d.logprobs.masked_fill(d.logprobs < threshold, -math.inf)

    return values


def test_top_entries_below_fp32_tiny_may_read_minus_inf() -> None:
    """vLLM's batched top-p masks a p=1 row's zero-probability tokens: -inf for a top-n token whose
    processed logprob is below log(2^-149) is legitimate (contract, "Probabilities fp32 cannot hold")."""
    spec = SamplingSpec(temperature=0.01)
    inputs = build(spec, _minus_inf_below(contract.FP32_LOG_TINY), top_n=VOCAB)
    underflowed = sum(1 for s in inputs for top in s.sample.top_values for v in top.values() if v == -math.inf)
    assert underflowed > 100  # the test exercises the allowance
    report = check(inputs, spec)
    assert report.passed, report.explain()


def test_minus_inf_for_a_representable_probability_still_fails() -> None:
    """The allowance stops at fp32's range: -inf for top-n tokens at logprob -20 ... -103 is a failure."""
    spec = SamplingSpec(temperature=0.01)
    report = check(build(spec, _minus_inf_below(-20.0), top_n=VOCAB), spec)
    assert not report.passed, report.explain()
    assert report.top_max_abs == math.inf


def _truncation_keeps(below: float, offset: float = 0.0) -> ValueFn:
    """The engine keeps every token the truncation drops whose untruncated logprob is below ``below``, with
    its value among the survivors (plus ``offset``): vLLM 0.26's Triton top-p on CUDA keeps such tokens."""

    def values(d: ProcessedDistribution, raw: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        out = d.logprobs.clone()
        untruncated = torch.log_softmax(d.scaled, dim=-1)
        for pos in range(out.shape[0]):
            kept = d.kept[pos]
            for t in range(out.shape[1]):
                if not kept[t] and untruncated[pos, t] < below:
                    with_t = kept.clone()
                    with_t[t] = True
                    out[pos, t] = untruncated[pos, t] - torch.logsumexp(untruncated[pos, with_t], dim=-1) + offset
        return out

    return values


def test_truncation_may_keep_a_token_of_zero_fp32_probability() -> None:
    """Top-p needs no mass from a token whose probability fp32 holds as 0, so an engine may keep it: a finite
    top-n value below log(2^-149) where the contract's top-p drops the token passes, if it is the token's
    value among the survivors (contract, "Probabilities fp32 cannot hold")."""
    spec = SamplingSpec(temperature=0.01, top_p=0.5)
    inputs = build(spec, _truncation_keeps(contract.FP32_LOG_TINY), top_n=VOCAB)
    kept = sum(
        1 for s in inputs for top in s.sample.top_values for v in top.values() if contract.FP32_LOG_TINY > v > -math.inf
    )
    assert kept > 100  # the test exercises the allowance
    report = check(inputs, spec)
    assert report.passed, report.explain()


def test_truncation_keeping_a_token_fp32_can_hold_fails() -> None:
    """Kept tokens with probability fp32 can hold (logprob above -103) are a truncation failure, and a kept
    zero-probability token with the wrong value is too."""
    spec = SamplingSpec(temperature=0.3, top_p=0.5)
    report = check(build(spec, _truncation_keeps(0.0), top_n=VOCAB), spec)
    assert not report.passed and report.top_max_abs == math.inf, report.explain()
    cold = SamplingSpec(temperature=0.01, top_p=0.5)
    wrong = check(build(cold, _truncation_keeps(contract.FP32_LOG_TINY, offset=50.0), top_n=VOCAB), cold)
    assert not wrong.passed and 49 < wrong.top_max_abs < math.inf, wrong.explain()


def test_mean_bound_needs_enough_tokens() -> None:
    """The mean-|Δ| bound judges an average: one token between the mean and the max bound passes (the max
    bound judges it), the same error on every token of a longer check fails (GPU fp32, session 5: one-token
    checks at |Δ| 0.0033 read as 'mean |Δ| > 0.003')."""
    spec = SamplingSpec(temperature=1.0)
    offset = (FP32.mean_abs + FP32.max_abs) / 2

    def shifted(d: ProcessedDistribution, raw: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return d.logprobs - offset

    one = check(build(spec, shifted, sequences=1, positions=1), spec)
    assert one.passed, one.explain()
    many = check(build(spec, shifted, sequences=2, positions=8), spec)
    assert not many.passed and any("mean |Δ|" in r for r in many.reasons), many.explain()
