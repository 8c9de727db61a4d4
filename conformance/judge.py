"""The one judge pipeline: engine samples -> reference logits for the same tokens -> the contract -> verdict.

Every verdict of the kit goes through :func:`judge_samples`: the suite (through
:class:`~conformance.runner.ParityRunner`), :func:`~conformance.api.assert_logprob_parity` in users'
own tests, golden replay and the weight-update tier. Given requests (one shared spec), the engine's
samples, a reference and each request's :class:`~conformance.spec.TokenContext`, it flattens the samples,
asks the reference for the fp32 raw logits at every generated position and hands them to
:func:`~conformance.parity.check_parity`, which reads them through the contract.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from conformance.engines.base import Engine, Request, Sample
from conformance.spec import TokenContext

if TYPE_CHECKING:
    from conformance.parity import ParityReport, Target
    from conformance.tolerances import Tolerance
    from conformance.trainer import Reference


def token_contexts(engine: Engine, requests: Sequence[Request]) -> list[TokenContext]:
    """The engine's :class:`TokenContext` of each request (its stop tokens and tokenised bad words)."""
    return [engine.token_context(r) for r in requests]


def judge_samples(
    requests: Sequence[Request],
    samples: Sequence[Sequence[Sample]],
    reference: Reference,
    contexts: Sequence[TokenContext],
    *,
    target: Target,
    tolerance: Tolerance,
    cell: str,
    engine_description: str = "",
    trainer_declared: bool = False,
    decode: Callable[[int], str] | None = None,
    keep: Callable[[Sample], bool] | None = None,
    seconds: dict[str, float] | None = None,
) -> ParityReport | None:
    """Judge ``samples`` (one group per request) against ``reference`` read as ``target``.

    ``seconds`` (optional) accumulates the wall time of the ``reference`` forward and of the ``contract``
    comparison. ``keep`` selects which samples count (e.g. only those served from the prefix cache); None when it
    leaves none. Requests must share one spec up to the seed, which the contract does not read (one
    verdict per spec): ``ValueError`` otherwise.
    """
    from conformance.parity import SequenceInput, check_parity

    if not requests:
        raise ValueError("judge_samples: no requests")
    if len(samples) != len(requests) or len(contexts) != len(requests):
        raise ValueError(
            f"judge_samples: {len(samples)} sample groups and {len(contexts)} contexts for {len(requests)} requests"
        )
    spec = requests[0].spec
    if any(replace(r.spec, seed=spec.seed) != spec for r in requests):
        raise ValueError("judge_samples: all requests must share one SamplingSpec up to the seed (judge once per spec)")
    flat = [(s, c) for group, c in zip(samples, contexts) for s in group if keep is None or keep(s)]
    if not flat:
        return None
    started = time.perf_counter()
    logits = reference.raw_logits([(s.prompt_ids, s.output_ids) for s, _ in flat])
    referenced = time.perf_counter()
    inputs = [SequenceInput(s, lg, c) for (s, c), lg in zip(flat, logits)]
    report = check_parity(
        inputs,
        spec,
        target,
        tolerance,
        cell,
        engine_description=engine_description,
        trainer_declared=trainer_declared,
        decode=decode,
    )
    if seconds is not None:
        seconds["reference"] = seconds.get("reference", 0.0) + referenced - started
        seconds["contract"] = seconds.get("contract", 0.0) + time.perf_counter() - referenced
    return report
