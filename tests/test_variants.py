"""The step-order variants of the contract (conformance/contract.py, section "step-order variants").

Each registered variant must (a) differ from the contract on some input where its step is active (a fixed
witness per variant; for "top_p before min_p" also a case computed by hand) and (b) equal the contract
exactly wherever :attr:`StepVariant.active` says its step is inactive (hypothesis over every sampling
parameter). Orders that commute with the contract's are proven equal to it here, which is why they are
not variants.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conformance import contract
from conformance.contract import CONTRACT_ORDER, VARIANTS, StepOrder, active_variants, processed_distribution
from conformance.spec import SamplingSpec, TokenContext
from conformance.strategies import Vocabulary, sampling_specs

VOCAB = 32
EOS = VOCAB - 1


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(one_torch_thread: None) -> None:
    """Tiny tensors: see tests/conftest.py."""


def _inputs(seed: int, positions: int = 6) -> tuple[torch.Tensor, list[int], tuple[int, ...]]:
    """Random fp32 logits, an output history and a prompt that repeat tokens (penalties see them)."""
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randn(positions, VOCAB, generator=gen) * 2.5
    prompt = tuple(torch.randint(0, 8, (10,), generator=gen).tolist())
    output = torch.randint(0, 8, (positions,), generator=gen).tolist()
    return raw, output, prompt


def _close(a: torch.Tensor, b: torch.Tensor, scaled: torch.Tensor) -> bool:
    """Equal up to fp32 rounding of the same arithmetic in another order, with the same masked tokens. The
    rounding is relative to the largest scaled logit (``scaled``: at T ~ 0.01 they reach thousands, and
    the normaliser carries their rounding into every logprob)."""
    if not torch.equal(torch.isfinite(a), torch.isfinite(b)):
        return False
    finite = torch.isfinite(a)
    if not finite.any():
        return True
    scale = float(scaled[torch.isfinite(scaled)].abs().max())
    return float((a[finite] - b[finite]).abs().max()) <= 1e-5 + 4e-7 * scale


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference of two logprob tables: inf where one masks a token the other keeps."""
    if not torch.equal(torch.isfinite(a), torch.isfinite(b)):
        return math.inf
    finite = torch.isfinite(a)
    return float((a[finite] - b[finite]).abs().max()) if finite.any() else 0.0


# name -> (spec, context kwargs) where the variant's step is active and its values differ
WITNESSES: dict[str, tuple[SamplingSpec, dict[str, Any]]] = {
    "top_p before min_p": (SamplingSpec(temperature=0.8, top_p=0.6, min_p=0.08), {}),
    "top_p before top_k": (SamplingSpec(temperature=1.2, top_p=0.7, top_k=3), {}),
    "top_p first": (SamplingSpec(temperature=1.2, top_p=0.7, top_k=4, min_p=0.05), {}),
    "top_p mass not renormalised": (SamplingSpec(temperature=1.2, top_p=0.6, top_k=4), {}),
    "top_p before temperature": (SamplingSpec(temperature=0.5, top_p=0.8), {}),
    "min_p before temperature": (SamplingSpec(temperature=0.5, min_p=0.1), {}),
    "min_p against the pre-penalty maximum": (
        SamplingSpec(temperature=1.0, min_p=0.1, logit_bias=((3, 6.0), (5, -4.0))),
        {},
    ),
    "repetition penalty over output only": (SamplingSpec(repetition_penalty=1.8), {}),
    "frequency/presence over prompt+output": (SamplingSpec(frequency_penalty=0.7), {}),
    "repetition penalty after frequency/presence": (SamplingSpec(repetition_penalty=1.8, presence_penalty=2.0), {}),
    "logit_bias after penalties": (SamplingSpec(repetition_penalty=1.8, logit_bias=((1, 3.0), (2, 3.0), (4, 3.0))), {}),
    "temperature before bias/penalties": (SamplingSpec(temperature=0.5, frequency_penalty=0.8), {}),
    "temperature not clamped": (SamplingSpec(temperature=0.004), {}),
    # a two-token bad word whose first token ends the prompt (prompt tokens never count in the contract)
    "bad words matched over prompt+output": (SamplingSpec(bad_words=("ab",)), {"bad_last_prompt": True}),
}


def _context(spec: SamplingSpec, prompt: tuple[int, ...], bad_last_prompt: bool = False) -> TokenContext:
    words: tuple[tuple[int, ...], ...] = ()
    if spec.bad_words:
        words = ((prompt[-1], 9),) if bad_last_prompt else ((3, 9), (12,))
    return TokenContext(prompt, frozenset({EOS}), words)


def test_every_variant_has_a_witness_and_names_its_step() -> None:
    assert set(WITNESSES) == set(VARIANTS)
    for name, variant in VARIANTS.items():
        step, description, fn = variant[:3]
        assert 1 <= step <= 11 and callable(fn), name
        assert f"step {step}" in description, (name, description)
        assert variant.order != CONTRACT_ORDER, name


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_differs_from_the_contract_where_its_step_is_active(name: str) -> None:
    spec, extra = WITNESSES[name]
    variant = VARIANTS[name]
    assert variant.active(spec), f"the witness of {name!r} does not activate it"
    gaps = []
    for seed in range(3):
        raw, output, prompt = _inputs(seed)
        context = _context(spec, prompt, **extra)
        gaps.append(
            _gap(variant.fn(raw, output, spec, context), processed_distribution(raw, output, spec, context).logprobs)
        )
    assert max(gaps) > 0.05, f"{name}: largest difference from the contract {max(gaps):.3g} on its witness"


def test_top_p_before_min_p_by_hand() -> None:
    """probs 0.5/0.3/0.15/0.05, min_p 0.2 (drops 0.05), top_p 0.82: renormalised over min_p's survivors the
    mass above the 0.15 token is 0.8/0.95 = 0.842 >= 0.82 (dropped); on the whole distribution it is
    0.8 < 0.82 (kept). Contract: log(0.5/0.8); top-p before min_p: log(0.5/0.95)."""
    raw = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    spec = SamplingSpec(top_p=0.82, min_p=0.2)
    ctx = TokenContext(())
    ours = processed_distribution(raw, [0], spec, ctx).logprobs
    theirs = VARIANTS["top_p before min_p"].fn(raw, [0], spec, ctx)
    assert float(ours[0, 0]) == pytest.approx(math.log(0.5 / 0.8), abs=1e-6)
    assert float(theirs[0, 0]) == pytest.approx(math.log(0.5 / 0.95), abs=1e-6)
    assert not math.isfinite(float(ours[0, 2])) and math.isfinite(float(theirs[0, 2]))


VOCABULARY = Vocabulary(size=VOCAB, eos_token_id=EOS, words=("ab", "cd"))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=sampling_specs(VOCABULARY, max_tokens=6), seed=st.integers(0, 2**16))
def test_inactive_variants_equal_the_contract(spec: SamplingSpec, seed: int) -> None:
    raw, output, prompt = _inputs(seed)
    context = _context(spec, prompt)
    contract_dist = processed_distribution(raw, output, spec, context)
    expected = contract_dist.logprobs
    active = set(active_variants(spec))
    for name, variant in VARIANTS.items():
        if name in active:
            continue
        got = variant.fn(raw, output, spec, context)
        assert torch.equal(torch.isfinite(got), torch.isfinite(expected)), (name, spec)
        assert _close(got, expected, contract_dist.scaled), (name, spec, _gap(got, expected))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=sampling_specs(VOCABULARY, max_tokens=6), seed=st.integers(0, 2**16))
def test_commuting_orders_are_not_variants(spec: SamplingSpec, seed: int) -> None:
    """top-k before min_p, and the repetition penalty / masks after temperature, give the contract's values
    (min_p is a ratio to the maximum, which top-k keeps; -inf and the sign of z survive a division by T)."""
    raw, output, prompt = _inputs(seed)
    context = _context(spec, prompt)
    dist = processed_distribution(raw, output, spec, context)
    expected = dist.logprobs
    swapped = processed_distribution(
        raw, output, spec, context, order=StepOrder(truncation_order=("top_k", "min_p", "top_p"))
    )
    assert _close(swapped.logprobs, expected, dist.scaled)
    only_masks = spec.reset("logit_bias", "frequency_penalty", "presence_penalty")
    dist = processed_distribution(raw, output, only_masks, context)
    expected = dist.logprobs
    early = processed_distribution(raw, output, only_masks, context, order=StepOrder(temperature_before_shaping=True))
    assert _close(early.logprobs, expected, dist.scaled)


def test_active_variants_of_a_plain_spec_is_empty() -> None:
    assert active_variants(SamplingSpec()) == []
    assert active_variants(SamplingSpec(temperature=0.0, top_p=0.5, min_p=0.5)) == []  # greedy: no truncation
    assert "top_p before min_p" in active_variants(SamplingSpec(top_p=0.5, min_p=0.5))
    assert contract.VARIANTS["top_p before min_p"].step == 10
