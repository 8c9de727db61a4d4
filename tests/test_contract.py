"""The contract (conformance/contract.py) against an independent brute-force reading of its docstring.

The brute force below uses only Python lists, loops and the ``math`` module (float64), one position at a
time, written from the numbered steps of the contract's docstring. Hypothesis draws small vocabularies,
fp32 logits, prompt/output histories and every :class:`SamplingSpec` parameter, and the contract's
processed logprobs must equal the brute force (and be -inf exactly where the brute force masks).

Truncation (min_p / top_k / top_p) is a threshold decision. The contract decides in fp32, the brute force
in float64, and tie-breaking among equal values is implementation-defined, so draws where a decision lies
within a tiny margin of its threshold (a few fp32 ulps of the values involved) are discarded with
``hypothesis.assume``. Exact ties that the contract must resolve deterministically (top_k keeps ties at the
k-th value; min_p keeps every token tied with the maximum) are *not* discarded when the tied tokens went
through identical arithmetic (same raw logit, bias and penalty history), since then they are bit-equal in
fp32 too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conformance.contract import (
    ProcessedDistribution,
    logprob_interval,
    mode_values,
    objective_mismatch,
    processed_distribution,
    trainer_values,
)
from conformance.spec import SamplingSpec, TokenContext

NEG_INF = float("-inf")
EPS32 = 2.0**-23  # fp32 machine epsilon

T = TypeVar("T")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(one_torch_thread: None) -> None:
    """Tiny tensors: see tests/conftest.py."""


SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)


# --------------------------------------------------------------------------------------------------------
# Brute force, straight from the docstring
# --------------------------------------------------------------------------------------------------------


@dataclass
class BruteRow:
    shaped: list[float]  # after steps 1-5
    scaled: list[float]  # after step 7 (== shaped for greedy)
    kept: list[bool]  # survivors of steps 8-10 (finite shaped values for greedy)
    logprobs: list[float]  # step 11
    ambiguous: bool  # a truncation decision is within the fp32 margin of its threshold
    margin: float  # fp32 error scale of ``scaled`` (logit units)


def _logsumexp(values: list[float]) -> float:
    finite = [v for v in values if v != NEG_INF]
    if not finite:
        return NEG_INF
    top = max(finite)
    return top + math.log(sum(math.exp(v - top) for v in finite))


def brute_shape(
    raw: list[float],
    position: int,
    prompt: list[int],
    output: list[int],
    spec: SamplingSpec,
    stop_ids: set[int],
    bad_words: list[tuple[int, ...]],
) -> tuple[list[float], list[tuple[float, float, bool, int]], float]:
    """Steps 1-5 for one position; also each token's arithmetic signature and an fp32 magnitude bound."""
    vocab = len(raw)
    history = output[:position]
    z = [float(v) for v in raw]
    # 1. allowed_token_ids
    if spec.allowed_token_ids is not None:
        for t in range(vocab):
            if t not in spec.allowed_token_ids:
                z[t] = NEG_INF
    # 2. bad words: last token masked when the *output* so far ends with the word's other tokens
    for word in bad_words:
        prefix = list(word[:-1])
        if len(prefix) == 0 or len(history) >= len(prefix) and history[len(history) - len(prefix) :] == prefix:
            z[word[-1]] = NEG_INF
    # 3. min_tokens: stop tokens masked while fewer than min_tokens tokens were generated
    if position < spec.min_tokens:
        for t in stop_ids:
            z[t] = NEG_INF
    # 4. logit bias
    bias = [0.0] * vocab
    for t, b in spec.logit_bias:
        bias[t] += b
    for t in range(vocab):
        z[t] = z[t] + bias[t]
    # 5. penalties
    seen = set(prompt) | set(history)
    counts = [0] * vocab
    for t in history:
        counts[t] += 1
    r = spec.repetition_penalty
    for t in range(vocab):
        if t in seen:
            if z[t] > 0:
                z[t] = z[t] / r
            else:
                z[t] = z[t] * r
    for t in range(vocab):
        z[t] = z[t] - spec.frequency_penalty * counts[t]
    for t in range(vocab):
        if counts[t] > 0:
            z[t] = z[t] - spec.presence_penalty
    signatures = [(float(raw[t]), bias[t], t in seen, counts[t]) for t in range(vocab)]
    rfac = max(r, 1.0 / r)
    magnitude = max(
        (abs(raw[t]) + abs(bias[t]) + abs(spec.frequency_penalty) * counts[t] + abs(spec.presence_penalty))
        * (rfac if t in seen else 1.0)
        for t in range(vocab)
    )
    return z, signatures, magnitude


def brute_row(
    raw: list[float],
    position: int,
    prompt: list[int],
    output: list[int],
    spec: SamplingSpec,
    stop_ids: set[int],
    bad_words: list[tuple[int, ...]],
) -> BruteRow:
    z, sig, magnitude = brute_shape(raw, position, prompt, output, spec, stop_ids, bad_words)
    vocab = len(z)
    finite = [t for t in range(vocab) if z[t] != NEG_INF]
    if not finite:  # fully masked: undefined (NaN in vLLM too); callers discard it
        return BruteRow(z, list(z), [False] * vocab, [NEG_INF] * vocab, True, 0.0)
    # 6. greedy only for an exact 0 (0 < T < 0.01 is clamped to 0.01, never greedy)
    if spec.temperature == 0.0:
        lse = _logsumexp(z)
        logprobs = [z[t] - lse if z[t] != NEG_INF else NEG_INF for t in range(vocab)]
        margin = 4 * EPS32 * (1.0 + magnitude)
        return BruteRow(z, list(z), [v != NEG_INF for v in z], logprobs, False, margin)
    # 7. temperature (after the clamp)
    temp = max(spec.temperature, 0.01)
    s = [v / temp for v in z]
    # fp32 error scale of the scaled logits (each token went through a handful of fp32 roundings)
    m = 4 * EPS32 * (1.0 + magnitude / temp)
    ambiguous = False
    survivors = list(finite)

    def near(u: int, t: int) -> bool:
        """s_u and s_t may compare differently in fp32 (close, and not bit-equal by construction)."""
        return sig[u] != sig[t] and abs(s[u] - s[t]) <= 2 * m

    # 8. min_p over softmax(z): drop t when p[t] < min_p * max p
    if spec.min_p > 0.0:
        top = max(s[t] for t in survivors)
        weights = {t: math.exp(s[t] - top) for t in survivors}
        total = sum(weights.values())
        probs = {t: w / total for t, w in weights.items()}
        pmax = max(probs.values())
        argmax_sigs = {sig[t] for t in survivors if s[t] == top}
        kept = []
        for t in survivors:
            if sig[t] not in argmax_sigs and abs((s[t] - top) - math.log(spec.min_p)) <= 2 * m + 1e-6:
                ambiguous = True
            if not (probs[t] < spec.min_p * pmax):
                kept.append(t)
        survivors = kept
    # 9. top_k: drop tokens below the k-th largest value (ties at the k-th value kept), i.e. keep t iff
    #    fewer than k survivors are strictly greater than t
    if spec.top_k > 0:
        k = spec.top_k
        kept = []
        for t in survivors:
            above = 0
            above_lo = 0
            above_hi = 0
            for u in survivors:
                if u == t:
                    continue
                if s[u] > s[t]:
                    above += 1
                if s[u] > s[t] and not near(u, t):
                    above_lo += 1
                if s[u] > s[t] or near(u, t):
                    above_hi += 1
            if (above_lo < k) != (above_hi < k):
                ambiguous = True
            if above < k:
                kept.append(t)
        survivors = kept
    # 10. top_p over softmax of the survivors: keep t iff the mass ranked strictly above it is < top_p
    if spec.top_p < 1.0:
        p = spec.top_p
        top = max(s[t] for t in survivors)
        weights = {t: math.exp(s[t] - top) for t in survivors}
        total = sum(weights.values())
        probs = {t: w / total for t, w in weights.items()}
        margin_p = 1e-5 + 4 * m
        kept = []
        for t in survivors:
            mass_above = sum(probs[u] for u in survivors if s[u] > s[t])
            # order among (near-)equal values is implementation-defined: the mass above t lies in [lo, hi]
            lo = sum(probs[u] for u in survivors if s[u] > s[t] + 2 * m)
            hi = sum(probs[u] for u in survivors if u != t and s[u] >= s[t] - 2 * m)
            if (lo < p) != (hi < p) or abs(lo - p) <= margin_p or abs(hi - p) <= margin_p:
                ambiguous = True
            if mass_above < p:
                kept.append(t)
        survivors = kept
    # 11. renormalised log_softmax over the survivors
    keep = [t in survivors for t in range(vocab)]
    lse = _logsumexp([s[t] for t in survivors])
    logprobs = [s[t] - lse if keep[t] else NEG_INF for t in range(vocab)]
    return BruteRow(z, s, keep, logprobs, ambiguous, m)


# --------------------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------------------


@dataclass
class Case:
    raw: list[list[float]]
    prompt: list[int]
    output: list[int]
    spec: SamplingSpec
    context: TokenContext

    @property
    def vocab(self) -> int:
        return len(self.raw[0])

    def tensor(self) -> torch.Tensor:
        return torch.tensor(self.raw, dtype=torch.float32)

    def brute(self) -> list[BruteRow]:
        return [
            brute_row(
                self.raw[i],
                i,
                self.prompt,
                self.output,
                self.spec,
                set(self.context.stop_token_ids),
                list(self.context.bad_words_token_ids),
            )
            for i in range(len(self.raw))
        ]


def _maybe(default: T, strategy: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    return st.one_of(st.just(default), strategy)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    vocab = draw(st.integers(5, 40))
    positions = draw(st.integers(1, 4))
    token = st.integers(0, vocab - 1)
    # half-integer logits make exact ties (top_k keeps ties at the k-th value; min_p keeps ties with the max)
    if draw(st.booleans()):
        logit = st.integers(-8, 8).map(lambda i: i / 2)
    else:
        logit = st.floats(-10.0, 10.0, width=32, allow_nan=False)
    raw = [draw(st.lists(logit, min_size=vocab, max_size=vocab)) for _ in range(positions)]
    prompt = draw(st.lists(token, max_size=8))
    output = draw(st.lists(token, min_size=positions, max_size=positions))

    # bad words: random tokens, or windows of the output so multi-token prefixes actually match
    random_word = st.lists(token, min_size=1, max_size=3).map(tuple)
    window = st.tuples(st.integers(0, positions - 1), st.integers(1, 3)).map(
        lambda ab: tuple(output[ab[0] : ab[0] + ab[1]]) + (draw_free_token(ab, vocab),)
    )
    bad_words = tuple(draw(st.lists(st.one_of(random_word, window), max_size=3)))

    eos = draw(st.one_of(st.none(), token))
    stop_extra = draw(st.frozensets(token, max_size=3))
    stop = frozenset(stop_extra | ({eos} if eos is not None else set()))
    spec = SamplingSpec(
        temperature=draw(st.one_of(st.just(1.0), st.just(0.0), st.floats(1e-4, 0.0099), st.floats(0.01, 2.0))),
        top_p=draw(_maybe(1.0, st.floats(0.01, 0.999))),
        top_k=draw(st.one_of(st.just(0), st.just(-1), st.integers(1, vocab + 2))),
        min_p=draw(_maybe(0.0, st.floats(0.001, 1.0))),
        repetition_penalty=draw(_maybe(1.0, st.floats(0.5, 2.0))),
        frequency_penalty=draw(_maybe(0.0, st.floats(-2.0, 2.0))),
        presence_penalty=draw(_maybe(0.0, st.floats(-2.0, 2.0))),
        logit_bias=tuple(
            draw(st.lists(st.tuples(token, st.floats(-5.0, 5.0, width=32)), max_size=4, unique_by=lambda tb: tb[0]))
        ),
        allowed_token_ids=draw(_maybe(None, st.frozensets(token, min_size=1).map(lambda s: tuple(sorted(s))))),
        bad_words=tuple(f"w{i}" for i in range(len(bad_words))),
        min_tokens=draw(st.integers(0, positions + 1)),
        stop_token_ids=tuple(sorted(stop_extra)),
        ignore_eos=draw(st.booleans()),
    )
    context = TokenContext(tuple(prompt), stop, bad_words)
    return Case(raw, prompt, output, spec, context)


def draw_free_token(ab: tuple[int, int], vocab: int) -> int:
    """A deterministic last token for an output-window bad word."""
    return (ab[0] * 7 + ab[1] * 3) % vocab


def _usable(case: Case, rows: list[BruteRow]) -> None:
    """Discard degenerate draws: a fully masked row, or a truncation decision within the fp32 margin."""
    for row in rows:
        assume(any(v != NEG_INF for v in row.shaped))
        assume(not row.ambiguous)


def _assert_matches(case: Case, rows: list[BruteRow], dist: ProcessedDistribution) -> None:
    got = dist.logprobs
    assert got.dtype == torch.float32
    for i, row in enumerate(rows):
        tol = 1e-5 + 4 * row.margin
        for t in range(case.vocab):
            want = row.logprobs[t]
            have = float(got[i, t])
            where = f"pos {i} token {t} ({case.spec.describe()}, context {case.context})"
            if want == NEG_INF:
                assert have == NEG_INF, f"{where}: brute force masks, contract gives {have}"
            else:
                assert math.isfinite(have), f"{where}: contract masks, brute force gives {want}"
                assert abs(have - want) <= tol, f"{where}: contract {have} vs brute force {want} (tol {tol:.2g})"
            assert bool(dist.kept[i, t]) == row.kept[t], where
            if row.shaped[t] == NEG_INF:
                assert float(dist.shaped[i, t]) == NEG_INF, where
            else:
                assert abs(float(dist.shaped[i, t]) - row.shaped[t]) <= tol * max(1.0, abs(row.shaped[t])), where


# --------------------------------------------------------------------------------------------------------
# Property tests
# --------------------------------------------------------------------------------------------------------


@SETTINGS
@given(cases())
def test_processed_logprobs_match_brute_force(case: Case) -> None:
    rows = case.brute()
    _usable(case, rows)
    dist = processed_distribution(case.tensor(), case.output, case.spec, case.context)
    _assert_matches(case, rows, dist)
    # processed_logits mode: the scaled logits with masked tokens at -inf
    logits = mode_values(dist, case.tensor(), "processed_logits")
    for i, row in enumerate(rows):
        for t in range(case.vocab):
            if not row.kept[t]:
                assert float(logits[i, t]) == NEG_INF
            else:
                want = row.scaled[t]
                assert abs(float(logits[i, t]) - want) <= (1e-5 + 4 * row.margin) * max(1.0, abs(want))


@settings(SETTINGS, max_examples=100)
@given(cases())
def test_raw_modes_and_trainers_ignore_the_sampler(case: Case) -> None:
    raw = case.tensor()
    assume(all(any(v != NEG_INF for v in r.shaped) for r in case.brute()))
    dist = processed_distribution(raw, case.output, case.spec, case.context)
    want_raw_lp = [[v - _logsumexp(row) for v in row] for row in case.raw]
    temp = 1.0 if case.spec.temperature == 0 else max(case.spec.temperature, 0.01)
    want_t_only = [[v / temp - _logsumexp([x / temp for x in row]) for v in row] for row in case.raw]
    checks = {
        "raw_logprobs": (mode_values(dist, raw, "raw_logprobs"), want_raw_lp, 1e-5),
        "raw_logits": (mode_values(dist, raw, "raw_logits"), case.raw, 0.0),
        "trainer raw": (trainer_values(raw, dist, case.spec, "raw"), want_raw_lp, 1e-5),
        "trainer temperature-only": (
            trainer_values(raw, dist, case.spec, "temperature-only"),
            want_t_only,
            1e-5 + 8 * EPS32 * 10.0 / temp,
        ),
    }
    for name, (have, want, tol) in checks.items():
        for i in range(len(case.raw)):
            for t in range(case.vocab):
                assert abs(float(have[i, t]) - want[i][t]) <= tol, f"{name} pos {i} token {t}"
    assert trainer_values(raw, dist, case.spec, "processed") is dist.logprobs


@settings(SETTINGS, max_examples=150)
@given(cases(), st.floats(0.0, 0.5))
def test_precision_bands(case: Case, band: float) -> None:
    rows = case.brute()
    assume(all(any(v != NEG_INF for v in r.shaped) for r in rows))
    dist = processed_distribution(case.tensor(), case.output, case.spec, case.context, band=band)
    kept, sure, maybe = dist.kept, dist.sure, dist.maybe
    assert torch.equal(kept, torch.isfinite(dist.logprobs))
    if band == 0.0 or not case.spec.truncates:
        assert torch.equal(sure, kept) and torch.equal(maybe, kept)
    assert not bool((sure & ~kept).any()), "sure must be a subset of kept"
    assert not bool((kept & ~maybe).any()), "kept must be a subset of maybe"
    # logprobs never depend on the band
    plain = processed_distribution(case.tensor(), case.output, case.spec, case.context)
    assert torch.equal(plain.logprobs, dist.logprobs)
    for i in range(len(case.raw)):
        tol = 1e-5 + 4 * rows[i].margin
        for t in range(case.vocab):
            low, high = logprob_interval(dist, i, t)
            if not bool(maybe[i, t]):
                assert (low, high) == (NEG_INF, NEG_INF)
                continue
            assert low <= high + tol
            if bool(kept[i, t]):
                point = float(dist.logprobs[i, t])
                assert low - tol <= point <= high + tol, f"pos {i} token {t}: {point} not in [{low}, {high}]"
            if bool(sure[i, t]) and torch.equal(sure[i], maybe[i]):
                assert abs(high - low) <= tol


@settings(SETTINGS, max_examples=50)
@given(cases())
def test_band_zero_equals_kept(case: Case) -> None:
    assume(all(any(v != NEG_INF for v in r.shaped) for r in case.brute()))
    dist = processed_distribution(case.tensor(), case.output, case.spec, case.context, band=0.0)
    assert torch.equal(dist.sure, dist.kept)
    assert torch.equal(dist.maybe, dist.kept)
    for i in range(len(case.raw)):
        for t in range(case.vocab):
            low, high = logprob_interval(dist, i, t)
            if bool(dist.kept[i, t]):
                assert low == pytest.approx(high, abs=1e-5)
                assert float(dist.logprobs[i, t]) == pytest.approx(low, abs=1e-4, rel=1e-5)
            else:
                assert (low, high) == (NEG_INF, NEG_INF)


# --------------------------------------------------------------------------------------------------------
# Hand-written examples of each docstring rule
# --------------------------------------------------------------------------------------------------------


def _dist(
    row: list[float], spec: SamplingSpec, output: Sequence[int] = (0,), prompt: Sequence[int] = (), **ctx: Any
) -> ProcessedDistribution:
    raw = torch.tensor([row] * len(output), dtype=torch.float32)
    return processed_distribution(raw, list(output), spec, TokenContext(tuple(prompt), **ctx))


def _kept(dist: ProcessedDistribution, position: int = 0) -> set[int]:
    return {int(t) for t in torch.nonzero(dist.kept[position]).flatten()}


def test_top_k_keeps_ties_at_kth_value() -> None:
    row = [1.0, 2.0, 2.0, 0.0, 2.0]
    assert _kept(_dist(row, SamplingSpec(top_k=1))) == {1, 2, 4}
    assert _kept(_dist(row, SamplingSpec(top_k=3))) == {1, 2, 4}
    assert _kept(_dist(row, SamplingSpec(top_k=4))) == {0, 1, 2, 4}
    assert _kept(_dist(row, SamplingSpec(top_k=-1))) == {0, 1, 2, 3, 4}


def test_top_p_mass_strictly_above() -> None:
    # probabilities 0.5, 0.3, 0.2: mass above = 0, 0.5, 0.8
    row = [math.log(0.5), math.log(0.3), math.log(0.2)]
    assert _kept(_dist(row, SamplingSpec(top_p=0.4))) == {0}
    assert _kept(_dist(row, SamplingSpec(top_p=0.6))) == {0, 1}
    assert _kept(_dist(row, SamplingSpec(top_p=0.9))) == {0, 1, 2}
    assert _kept(_dist(row, SamplingSpec(top_p=0.01))) == {0}  # the most probable always survives
    lp = _dist(row, SamplingSpec(top_p=0.6)).logprobs[0]
    assert float(lp[0]) == pytest.approx(math.log(0.5 / 0.8), abs=1e-6)
    assert float(lp[1]) == pytest.approx(math.log(0.3 / 0.8), abs=1e-6)


def test_top_p_runs_over_min_p_and_top_k_survivors() -> None:
    # p = 0.4, 0.3, 0.2, 0.1. top_k=2 leaves {0,1} renormalised to 4/7, 3/7: top_p=0.5 keeps only 0
    row = [math.log(x) for x in (0.4, 0.3, 0.2, 0.1)]
    assert _kept(_dist(row, SamplingSpec(top_k=2, top_p=0.5))) == {0}
    # without top_k, mass above token 1 is 0.4 < 0.5: token 1 survives
    assert _kept(_dist(row, SamplingSpec(top_p=0.5))) == {0, 1}
    # min_p=0.6 drops 2 (0.2 < 0.24) and 3; then top_p=0.6: 0.4/0.7 = 0.571 < 0.6 keeps token 1
    assert _kept(_dist(row, SamplingSpec(min_p=0.6, top_p=0.6))) == {0, 1}


def test_min_p_relative_to_max() -> None:
    row = [math.log(x) for x in (0.5, 0.3, 0.15, 0.05)]
    assert _kept(_dist(row, SamplingSpec(min_p=0.2))) == {0, 1, 2}  # 0.05 < 0.1
    assert _kept(_dist(row, SamplingSpec(min_p=0.5))) == {0, 1}  # 0.15 < 0.25
    assert _kept(_dist(row, SamplingSpec(min_p=1.0))) == {0}


def test_greedy_ignores_temperature_and_truncation() -> None:
    row = [3.0, 1.0, 0.5, -2.0]
    spec = SamplingSpec(temperature=0.0, top_k=1, top_p=0.1, min_p=0.9)
    dist = _dist(row, spec)
    assert _kept(dist) == {0, 1, 2, 3}
    want = torch.log_softmax(torch.tensor(row), dim=-1)
    assert torch.allclose(dist.logprobs[0], want, atol=1e-6)
    assert torch.equal(dist.scaled, dist.shaped)


def test_clamped_temperature_is_not_greedy() -> None:
    row = [3.0, 2.99, -1.0]
    dist = _dist(row, SamplingSpec(temperature=0.005))
    z = [v / 0.01 for v in row]
    lse = _logsumexp(z)
    assert float(dist.logprobs[0, 1]) == pytest.approx(z[1] - lse, abs=1e-4)
    assert _kept(_dist(row, SamplingSpec(temperature=0.005, top_k=1))) == {0}


def test_bad_words_match_output_history_only() -> None:
    row = [0.0] * 6
    ctx = {"bad_words_token_ids": ((2, 3),)}
    # prompt ends with 2 but no output yet: the word (2, 3) does not fire at position 0
    dist = _dist(row, SamplingSpec(), output=(2, 5, 2), prompt=(1, 2), **ctx)
    assert float(dist.logprobs[0, 3]) > NEG_INF
    assert float(dist.logprobs[1, 3]) == NEG_INF  # output so far (2,) ends with the prefix
    assert float(dist.logprobs[2, 3]) > NEG_INF  # (2, 5) does not
    single = _dist(row, SamplingSpec(), output=(0, 0), bad_words_token_ids=((4,),))
    assert bool((single.logprobs[:, 4] == NEG_INF).all())


def test_min_tokens_masks_stop_tokens_while_short() -> None:
    row = [0.0] * 5
    dist = _dist(row, SamplingSpec(min_tokens=2, ignore_eos=True), output=(0, 1, 2), stop_token_ids=frozenset({4, 3}))
    assert [float(dist.logprobs[i, 4]) == NEG_INF for i in range(3)] == [True, True, False]
    assert [float(dist.logprobs[i, 3]) == NEG_INF for i in range(3)] == [True, True, False]


def test_penalties_prompt_vs_output() -> None:
    row = [2.0, -2.0, 2.0, 1.0]
    spec = SamplingSpec(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25, temperature=0.0)
    dist = _dist(row, spec, output=(3, 2, 2), prompt=(0, 1))
    shaped = dist.shaped.tolist()
    assert shaped[0] == pytest.approx([1.0, -4.0, 2.0, 1.0])  # prompt tokens: repetition only
    assert shaped[1] == pytest.approx([1.0, -4.0, 2.0, 0.5 - 0.5 - 0.25])
    assert shaped[2] == pytest.approx([1.0, -4.0, 1.0 - 0.5 - 0.25, 0.5 - 0.5 - 0.25])


def test_effective_temperature() -> None:
    assert SamplingSpec(temperature=0.0).greedy
    assert SamplingSpec(temperature=0.0).effective_temperature == 1.0
    assert not SamplingSpec(temperature=0.005).greedy
    assert SamplingSpec(temperature=0.005).effective_temperature == 0.01
    assert SamplingSpec(temperature=0.7).effective_temperature == 0.7
    assert not SamplingSpec(temperature=0.0, top_p=0.5, top_k=3).truncates


def test_objective_mismatch() -> None:
    spec = SamplingSpec(temperature=0.7, top_p=0.9)
    assert objective_mismatch(spec, "processed") is None
    reason = objective_mismatch(spec, "temperature-only")
    assert reason is not None and "top_p" in reason
    assert objective_mismatch(SamplingSpec(temperature=0.7), "temperature-only") is None
    raw_reason = objective_mismatch(SamplingSpec(temperature=0.7), "raw")
    assert raw_reason is not None and "temperature" in raw_reason
    shaped = objective_mismatch(SamplingSpec(repetition_penalty=1.2), "temperature-only")
    assert shaped is not None and "repetition_penalty" in shaped
    assert objective_mismatch(SamplingSpec(temperature=0.0, top_p=0.5), "temperature-only") is None


# --------------------------------------------------------------------------------------------------------
# Against vLLM's own sampler ops (skipped without vllm; the import takes several seconds)
# --------------------------------------------------------------------------------------------------------


def test_contract_matches_vllm_sampler_ops() -> None:
    pytest.importorskip("vllm")
    from vllm.model_executor.layers.utils import apply_penalties
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    gen = torch.Generator().manual_seed(1234)
    rows, vocab = 48, 37
    logits = torch.randn(rows, vocab, generator=gen) * 3
    ks = [0, 1, 3, 10, vocab, 5] * 8
    ps = [1.0, 0.3, 0.9, 0.5, 0.75, 1.0] * 8
    ks_t = torch.tensor([k if k > 0 else vocab for k in ks], dtype=torch.long)
    ps_t = torch.tensor(ps, dtype=torch.float32)
    theirs = apply_top_k_top_p_pytorch(logits.clone(), ks_t, ps_t)
    for i in range(rows):
        spec = SamplingSpec(top_k=ks[i], top_p=ps[i])
        dist = processed_distribution(logits[i : i + 1], [0], spec, TokenContext(()))
        assert torch.equal(dist.kept[0], torch.isfinite(theirs[i])), f"row {i}: {spec.describe()}"
        want = torch.log_softmax(theirs[i], dim=-1)
        assert torch.allclose(dist.logprobs[0], want, atol=1e-6, equal_nan=False), f"row {i}"

    # penalties: one sequence, every position, histories prompt + output[:i]
    prompt = [1, 4, 4, 9, 30]
    output = [4, 7, 7, 12, 1, 7]
    raw = torch.randn(len(output), vocab, generator=gen) * 3
    spec = SamplingSpec(repetition_penalty=1.7, frequency_penalty=0.4, presence_penalty=-0.3, temperature=0.0)
    shaped = processed_distribution(raw, output, spec, TokenContext(tuple(prompt))).shaped
    pad = vocab
    hist = [output[:i] + [pad] * (len(output) - i) for i in range(len(output))]
    theirs = apply_penalties(
        raw.clone(),
        torch.tensor([prompt] * len(output)),
        torch.tensor(hist),
        torch.full((len(output),), spec.presence_penalty),
        torch.full((len(output),), spec.frequency_penalty),
        torch.full((len(output),), spec.repetition_penalty),
    )
    assert torch.allclose(shaped, theirs, atol=1e-6)


# --------------------------------------------------------------------------------------------------------
# Precision bands cover real perturbations (regressions of bugs found in review)
# --------------------------------------------------------------------------------------------------------


def _band_case(
    raw: list[float], spec: SamplingSpec, band: float, delta: list[float], prompt: Sequence[int] = ()
) -> tuple[set[int], set[int], set[int], set[int]]:
    """(kept, sure, maybe) at the reference and the kept set of the reference perturbed by ``delta``."""
    assert max(abs(d) for d in delta) <= band
    ctx = TokenContext(tuple(prompt))
    ref = torch.tensor([raw], dtype=torch.float32)
    dist = processed_distribution(ref, [0], spec, ctx, band=band)
    moved = processed_distribution(ref + torch.tensor([delta]), [0], spec, ctx)
    return (
        _kept(dist),
        {int(t) for t in torch.nonzero(dist.sure[0]).flatten()},
        {int(t) for t in torch.nonzero(dist.maybe[0]).flatten()},
        _kept(moved),
    )


def test_top_p_maybe_covers_joint_perturbation() -> None:
    kept, _sure, maybe, moved = _band_case([1.0, 0.0, -0.05], SamplingSpec(top_p=0.54), 0.1, [-0.1, 0.1, 0.1])
    assert kept == {0} and moved == {0, 1}
    assert moved <= maybe


def test_top_p_sure_covers_joint_perturbation() -> None:
    kept, sure, _maybe, moved = _band_case([1.0, 0.0, -0.5], SamplingSpec(top_p=0.66), 0.1, [0.1, -0.1, -0.1])
    assert kept == {0, 1} and moved == {0}
    assert sure <= moved


def test_maybe_covers_min_p_then_top_k_cascade() -> None:
    spec = SamplingSpec(min_p=0.5, top_k=1)
    kept, _sure, maybe, moved = _band_case([0.0, -0.8, -5.0], spec, 0.5, [-0.5, 0.5, 0.0])
    assert kept == {0} and moved == {1}
    assert moved <= maybe


def test_maybe_covers_repetition_penalty_scaling() -> None:
    spec = SamplingSpec(top_k=1, repetition_penalty=2.0)
    kept, _sure, maybe, moved = _band_case([-1.0, -1.0015, -5.0], spec, 1e-3, [-1e-3, 1e-3, 0.0], prompt=(0, 1))
    assert kept == {0} and moved == {1}
    assert moved <= maybe


def test_trainer_semantics_names() -> None:
    from conformance.spec import TRAINER_SEMANTICS, trainer_semantics

    assert [trainer_semantics(name) for name in TRAINER_SEMANTICS] == list(TRAINER_SEMANTICS)
    with pytest.raises(ValueError, match="expected one of processed, temperature-only, raw"):
        trainer_semantics("temperature")
