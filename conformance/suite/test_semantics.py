"""Semantic layer: the engine's logprobs mean what the contract (or the declared trainer) says.

For every cell and every hypothesis example: each returned value (sampled token and top-n) equals the
contract's value over the fp32 reference within the cell's tolerance; the sampled token's value is always
present; no token the contract masks is ever sampled; greedy tokens are the argmax of the processed
logits. A failure names the layer (semantic / inference-path / objective / engine).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st

from conformance.checks import check_cases
from conformance.parity import ParityReport
from conformance.strategies import Case, cases, sampling_specs

pytestmark = [pytest.mark.parity, pytest.mark.family("semantic")]


def _focused(parity_settings: Any) -> Any:
    """Focused properties re-check a corner the main property also draws: a fifth of its examples."""
    return settings(parity_settings, max_examples=max(10, parity_settings.max_examples // 5))


def test_logprobs_match_contract(parity_runner: Any, parity_vocab: Any, parity_settings: Any) -> None:
    """Every sampling parameter at once: values match the contract for the cell's mode."""
    check_cases(
        parity_runner,
        cases(parity_vocab, len(parity_runner.prompts.ids)),
        parity_settings,
        "test_logprobs_match_contract",
    )


def test_greedy_is_argmax_of_processed_logits(parity_runner: Any, parity_vocab: Any, parity_settings: Any) -> None:
    """temperature=0 with penalties, bias and masks: the chosen token is the processed argmax."""
    specs = sampling_specs(parity_vocab, temperature=st.just(0.0))
    check_cases(
        parity_runner,
        cases(parity_vocab, len(parity_runner.prompts.ids), specs=specs),
        _focused(parity_settings),
        "test_greedy_is_argmax_of_processed_logits",
    )


def _only_allowed_tokens(case: Case, report: ParityReport) -> None:
    allowed = set(case.spec.allowed_token_ids or ())
    sampled = {row.token for row in report.rows if row.kind == "sampled"}
    outside = sorted(sampled - allowed)
    assert not outside, f"tokens outside allowed_token_ids were sampled: {outside[:10]} ({case.spec.describe()})"


def test_masked_tokens_never_sampled(parity_runner: Any, parity_vocab: Any, parity_settings: Any) -> None:
    """A small allowed set plus truncation: only allowed, surviving tokens are ever sampled."""
    allowed = st.frozensets(st.integers(0, parity_vocab.size - 1), min_size=8, max_size=24)
    specs = st.builds(
        lambda spec, ids: dataclasses.replace(spec, allowed_token_ids=tuple(sorted(ids))),
        sampling_specs(parity_vocab),
        allowed,
    )
    check_cases(
        parity_runner,
        cases(parity_vocab, len(parity_runner.prompts.ids), specs=specs),
        _focused(parity_settings),
        "test_masked_tokens_never_sampled",
        extra=_only_allowed_tokens,
    )
