"""Fault injection for self-tests: a real engine wrapped so that one known bug class shows up.

The wrapper forwards every call to a running real vLLM engine and alters only what the fault class
alters (values on prefix-cache hits, values of batched requests, prefill-rescore values, ...), so the
suite's tests run unchanged and must catch the fault with the right layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from conformance.engines.base import Request, Sample

Fault = Callable[[Sequence[Request], list[list[Sample]]], list[list[Sample]]]


def _shift(sample: Sample, delta: float) -> Sample:
    return dataclasses.replace(
        sample,
        sampled_values=[None if v is None else v + delta for v in sample.sampled_values],
        top_values=[{t: v + delta for t, v in top.items()} for top in sample.top_values],
    )


def on_cache_hit(delta: float) -> Fault:
    """Shift every value of a request served (partly) from the prefix cache."""

    def fault(requests: Sequence[Request], out: list[list[Sample]]) -> list[list[Sample]]:
        return [[_shift(s, delta) if (s.cached_tokens or 0) > 0 else s for s in group] for group in out]

    return fault


def when_batched(delta: float) -> Fault:
    """Shift every value whenever the batch holds more than one request."""

    def fault(requests: Sequence[Request], out: list[list[Sample]]) -> list[list[Sample]]:
        if len(requests) <= 1:
            return out
        return [[_shift(s, delta) for s in group] for group in out]

    return fault


def on_prefill_rescore(delta: float) -> Fault:
    """Shift the prompt logprobs (the prefill path) but not the decode-time values."""

    def fault(requests: Sequence[Request], out: list[list[Sample]]) -> list[list[Sample]]:
        shifted = []
        for group in out:
            shifted.append(
                [
                    dataclasses.replace(
                        s,
                        prompt_values=[
                            None if e is None else {t: v + delta for t, v in e.items()} for e in s.prompt_values
                        ],
                    )
                    for s in group
                ]
            )
        return shifted

    return fault


def shifted_by_one_position() -> Fault:
    """Report each sampled token's value one position late (a reporting off-by-one)."""

    def fault(requests: Sequence[Request], out: list[list[Sample]]) -> list[list[Sample]]:
        return [
            [dataclasses.replace(s, sampled_values=[s.sampled_values[0]] + s.sampled_values[:-1]) for s in group]
            for group in out
        ]

    return fault


class FaultyEngine:
    """Forwards to ``inner`` (a started engine) and applies ``fault`` to what ``generate`` returns."""

    def __init__(self, inner: Any, fault: Fault) -> None:
        self.inner = inner
        self.fault = fault

    def generate(self, requests: Sequence[Request]) -> list[list[Sample]]:
        return self.fault(requests, self.inner.generate(requests))

    def close(self) -> None:
        """The inner engine belongs to the session's pool; it is closed there."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def samples_elsewhere(seed: int = 0) -> Fault:
    """Report the engine's values but replace each first sampled token by a uniform draw among the
    tokens the engine reported as possible: the sampler draws from another distribution."""
    import random

    rng = random.Random(seed)

    def fault(requests: Sequence[Request], out: list[list[Sample]]) -> list[list[Sample]]:
        changed = []
        for group in out:
            row = []
            for s in group:
                options = [t for t, v in (s.top_values[0] if s.top_values else {}).items() if v > float("-inf")]
                if options:
                    s = dataclasses.replace(s, output_ids=[rng.choice(sorted(options))] + s.output_ids[1:])
                row.append(s)
            changed.append(row)
        return changed

    return fault


def _jitter(sample: Sample, delta: float) -> Sample:
    """Numerical noise rather than an offset: +delta and -delta on alternating positions."""
    sign = [delta if i % 2 == 0 else -delta for i in range(len(sample.sampled_values))]
    return dataclasses.replace(
        sample,
        sampled_values=[None if v is None else v + d for v, d in zip(sample.sampled_values, sign)],
        top_values=[{t: v + d for t, v in top.items()} for top, d in zip(sample.top_values, sign)],
    )


def on_long_prefill(delta: float, budget: int) -> Fault:
    """Jitter the values of a request whose prompt is longer than one step's token budget (chunked)."""

    def fault(requests: Sequence[Request], out: list[list[Sample]]) -> list[list[Sample]]:
        return [
            [_jitter(s, delta) if len(r.prompt_ids) > budget else s for s in group] for r, group in zip(requests, out)
        ]

    return fault


def top_n_drift(delta: float) -> Fault:
    """Leave the sampled token's value alone, move the other top-n values: a full-distribution gap."""

    def fault(requests: Sequence[Request], out: list[list[Sample]]) -> list[list[Sample]]:
        return [
            [
                dataclasses.replace(
                    s,
                    top_values=[
                        {t: (v if t == s.output_ids[i] else v + delta) for t, v in top.items()}
                        for i, top in enumerate(s.top_values)
                    ],
                )
                for s in group
            ]
            for group in out
        ]

    return fault
