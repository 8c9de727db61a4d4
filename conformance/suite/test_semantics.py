"""Semantic layer: the engine's logprobs mean what the contract (or the declared trainer) says.

For every cell and every hypothesis example: each returned value (sampled token and top-n) equals the
contract's value over the fp32 reference within the cell's tolerance; the sampled token's value is always
present; no token the contract masks is ever sampled; greedy tokens are the argmax of the processed
logits. A failure names the layer (semantic / inference-path / objective / engine).
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import strategies as st

from conformance.parity import ParityReport
from conformance.plugin.fixture import Parity
from conformance.strategies import Case, cases, sampling_specs

pytestmark = [pytest.mark.parity, pytest.mark.family("semantic")]


def test_logprobs_match_contract(parity: Parity) -> None:
    """Every sampling parameter at once: values match the contract for the cell's mode."""
    parity.check(cases(parity.vocab, len(parity.prompts.ids)))


def test_greedy_is_argmax_of_processed_logits(parity: Parity) -> None:
    """temperature=0 with penalties, bias and masks: the chosen token is the processed argmax."""
    specs = sampling_specs(parity.vocab, temperature=st.just(0.0))
    parity.check(cases(parity.vocab, len(parity.prompts.ids), specs=specs), settings=parity.fewer(5, 10))


def _only_allowed_tokens(case: Case, report: ParityReport) -> None:
    allowed = set(case.spec.allowed_token_ids or ())
    sampled = {row.token for row in report.rows if row.kind == "sampled"}
    outside = sorted(sampled - allowed)
    assert not outside, f"tokens outside allowed_token_ids were sampled: {outside[:10]} ({case.spec.describe()})"


def test_masked_tokens_never_sampled(parity: Parity) -> None:
    """A small allowed set plus truncation: only allowed, surviving tokens are ever sampled."""
    allowed = st.frozensets(st.integers(0, parity.vocab.size - 1), min_size=8, max_size=24)
    specs = st.builds(
        lambda spec, ids: dataclasses.replace(spec, allowed_token_ids=tuple(sorted(ids))),
        sampling_specs(parity.vocab),
        allowed,
    )
    parity.check(
        cases(parity.vocab, len(parity.prompts.ids), specs=specs),
        settings=parity.fewer(5, 10),
        extra=_only_allowed_tokens,
    )
