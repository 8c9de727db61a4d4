"""conformance/ablation.py with fake checks (no engine): the minimal failing parameter set, the one-at-a-time
table, the call budget and the sentence a failure prints."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conformance.ablation import ABLATED_FIELDS, Ablation, Outcome, ablate, ablated_fields
from conformance.spec import SamplingSpec

FAILING = SamplingSpec(
    temperature=0.7,
    top_p=0.5,
    min_p=0.5,
    top_k=20,
    frequency_penalty=0.3,
    logit_bias=((3, 1.0),),
    seed=4,
    max_tokens=2,
    logprobs=2,
    n=2,
)


def fails_while(*groups: tuple[str, ...]) -> Callable[[SamplingSpec], Outcome]:
    """A fake check that fails while every parameter of any one group is set (non-default)."""

    def outcome(spec: SamplingSpec) -> Outcome:
        set_now = set(spec.non_default())
        return "failed" if any(set(g) <= set_now for g in groups) else "passed"

    return outcome


def counting(check: Callable[[SamplingSpec], Outcome]) -> tuple[Callable[[SamplingSpec], Outcome], list[SamplingSpec]]:
    seen: list[SamplingSpec] = []

    def outcome(spec: SamplingSpec) -> Outcome:
        seen.append(spec)
        return check(spec)

    return outcome, seen


def test_ablated_fields_keep_generation_parameters_fixed() -> None:
    assert ablated_fields(FAILING) == ["temperature", "min_p", "top_k", "top_p", "logit_bias", "frequency_penalty"]
    for name in ("seed", "n", "max_tokens", "logprobs", "stop_token_ids", "ignore_eos"):
        assert name not in ABLATED_FIELDS
    greedy = SamplingSpec(temperature=0.0, top_p=0.5, repetition_penalty=1.2)
    assert ablated_fields(greedy) == ["repetition_penalty"]  # T=0 stays greedy; vLLM ignores top_p there


def test_pair_interaction_is_found_and_said() -> None:
    check, seen = counting(fails_while(("min_p", "top_p")))
    result = ablate(FAILING, check)
    assert result.minimal == ("min_p", "top_p")
    assert result.proven
    assert result.one_at_a_time == {
        "temperature": "failed",
        "min_p": "passed",
        "top_k": "failed",
        "top_p": "passed",
        "frequency_penalty": "failed",
        "logit_bias": "failed",
    }
    assert result.calls == len(seen) == 6 + 1 + 2  # one at a time, the needed pair, each half of it
    for spec in seen:  # generation parameters never touched
        assert (spec.seed, spec.n, spec.max_tokens, spec.logprobs) == (4, 2, 2, 2)
    assert result.consistent
    text = result.summary()
    assert text.startswith("fails only while min_p=0.5 and top_p=0.5 are both set; passes with either removed")
    assert "still fails with temperature, top_k, logit_bias, frequency_penalty removed" in text
    assert "(9 engine re-runs)" in text


def test_single_parameter() -> None:
    result = ablate(FAILING, fails_while(("frequency_penalty",)))
    assert result.minimal == ("frequency_penalty",) and result.proven
    assert result.summary().startswith("fails while frequency_penalty=0.3 is set; passes with it removed")


def test_either_of_two_parameters_finds_one_minimal_set() -> None:
    """Disjunction: any single removal still fails, ddmin still ends at a 1-minimal set."""
    check = fails_while(("top_k",), ("logit_bias",))
    result = ablate(FAILING, check)
    assert len(result.minimal) == 1 and result.minimal[0] in ("top_k", "logit_bias")
    assert all(o == "failed" for o in result.one_at_a_time.values())
    assert result.proven
    kept_only = FAILING.reset(*(n for n in result.fields if n not in result.minimal))
    assert check(kept_only) == "failed"
    assert check(FAILING.reset(*result.minimal, *(n for n in result.fields if n not in result.minimal))) == "passed"


def test_failure_without_any_parameter() -> None:
    result = ablate(FAILING, lambda spec: "failed")
    assert result.minimal == ()
    assert "fails with every sampling parameter at its default" in result.summary()


def test_budget_stops_the_search_and_says_so() -> None:
    check, seen = counting(fails_while(("min_p", "top_p")))
    result = ablate(FAILING, check, max_calls=4)
    assert len(seen) == result.calls == 4
    assert not result.proven
    assert set(result.minimal) >= {"min_p", "top_p"}  # the best failing set known when it stopped
    assert "search stopped after 4 re-runs" in result.summary()


def test_engine_errors_are_neither_pass_nor_fail() -> None:
    def check(spec: SamplingSpec) -> Outcome:
        return "error" if spec.top_k == 0 else fails_while(("min_p", "top_p"))(spec)

    result = ablate(FAILING, check)
    assert result.one_at_a_time["top_k"] == "error"
    assert not result.proven
    assert "the engine failed with top_k removed" in result.summary()


def test_defaults_only_spec_needs_no_call() -> None:
    check, seen = counting(fails_while(()))
    result = ablate(SamplingSpec(seed=3), check)
    assert result.calls == 0 and seen == [] and result.minimal == ()
    assert "already at its default" in result.summary()
    record = result.as_record()
    assert record["minimal"] == [] and record["calls"] == 0


PARAMS = ["temperature", "min_p", "top_k", "top_p", "frequency_penalty", "logit_bias"]


@settings(max_examples=200, deadline=None)
@given(groups=st.lists(st.frozensets(st.sampled_from(PARAMS), min_size=1, max_size=3), min_size=1, max_size=3))
def test_ddmin_result_is_one_minimal_for_any_monotone_check(groups: list[frozenset[str]]) -> None:
    check = fails_while(*(tuple(g) for g in groups))
    result = ablate(FAILING, check, max_calls=64)
    assert result.proven
    minimal = set(result.minimal)
    reset_others = FAILING.reset(*(n for n in PARAMS if n not in minimal))
    assert check(reset_others) == "failed"
    for name in minimal:
        assert check(reset_others.reset(name)) == "passed", (groups, minimal, name)
    assert result.calls <= 6 + 1 + 2 * 6 + 1 + 6 * 2  # loose bound: never more than a few dozen


@pytest.mark.parametrize("calls", [1, 24])
def test_as_record_carries_the_table(calls: int) -> None:
    result: Ablation = ablate(FAILING, fails_while(("min_p", "top_p")), max_calls=calls)
    record = result.as_record()
    assert set(record) == {"fields", "minimal", "proven", "one_at_a_time", "calls", "summary"}
    assert record["calls"] == min(calls, 9)


def test_a_check_failing_at_random_is_not_consistent() -> None:
    """Outcomes that do not follow the parameters (here: fails iff an even number of them is set): ddmin
    still returns a 1-minimal set, but some re-run that kept it passed, so it is not called consistent
    and the diagnosis does not reclass the failure as parameter-dependent."""

    def outcome(spec: SamplingSpec) -> Outcome:
        return "failed" if len(ablated_fields(spec)) % 2 == 0 else "passed"

    result = ablate(FAILING, outcome)
    assert len(result.minimal) == 2 and result.proven
    assert not result.consistent
