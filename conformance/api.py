"""One-call parity assertion for custom tests in another repository.

:func:`assert_logprob_parity` sends requests to an engine (or takes samples you already have), scores
the same tokens with a reference (the kit's fp32 HF model, any :class:`~conformance.trainer.Reference`,
or your trainer's logits function), reads them through the kit's contract and raises ``AssertionError``
with the kit's explanation (layer, worst tokens, RL metrics) unless they agree within the tolerance::

    from conformance import SamplingSpec, Request, assert_logprob_parity
    from conformance.engines.vllm_server import VllmServerEngine

    engine = VllmServerEngine(cell, model_dir)            # or your own Engine implementation
    report = assert_logprob_parity(engine, my_trainer_logits, [Request(prompt_ids, SamplingSpec(temperature=0.7))],
                                   cell=cell, trainer="processed", model_path=model_dir)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from conformance.engines.base import Engine, Request, Sample
from conformance.judge import judge_samples, token_contexts
from conformance.matrix import Cell
from conformance.parity import ParityReport
from conformance.spec import TrainerSemantics
from conformance.tolerances import Tolerance
from conformance.trainer import Reference, TrainerFnReference


def as_reference(reference: Reference | Callable[..., Sequence[Any]], model_path: Path | None = None) -> Reference:
    """``reference`` itself when it has ``raw_logits``, else a trainer logits function wrapped as one."""
    if hasattr(reference, "raw_logits") and hasattr(reference, "vocab_size"):
        return reference
    return TrainerFnReference(reference, model_path)


def assert_logprob_parity(
    engine: Engine,
    reference: Reference | Callable[..., Sequence[Any]],
    requests: Sequence[Request],
    *,
    cell: Cell | None = None,
    tolerance: Tolerance | None = None,
    trainer: TrainerSemantics | None = None,
    samples: Sequence[Sequence[Sample]] | None = None,
    model_path: Path | None = None,
    decode: Callable[[int], str] | None = None,
) -> ParityReport:
    """Assert that ``engine``'s logprobs for ``requests`` are what ``reference`` and the contract say.

    * ``engine``: a started :class:`~conformance.engines.base.Engine` (its ``token_context`` and
      ``logprobs_mode`` are used even when ``samples`` are given).
    * ``reference``: an object with ``raw_logits`` / ``vocab_size`` (e.g. :class:`~conformance.HFReference`)
      or a trainer logits function ``fn(sequences[, model_path]) -> [len(completion), vocab]`` per sequence.
    * ``requests``: all with the same :class:`~conformance.spec.SamplingSpec` (one verdict per spec).
    * ``cell`` gives the tolerance and names the verdict; or pass ``tolerance`` (then the cell is "custom").
    * ``trainer``: what your trainer computes (``processed``, ``temperature-only``, ``raw``); default:
      the engine's logprobs mode, i.e. the engine is judged against its own declared semantics.
    * ``samples``: the engine's output for ``requests`` if you already generated it (else generated here).

    The verdict comes from the kit's one judge pipeline (:func:`~conformance.judge.judge_samples`).
    Returns the :class:`~conformance.parity.ParityReport`; raises ``AssertionError`` with
    ``report.explain()`` when it failed, ``ValueError`` for inconsistent arguments.
    """
    if tolerance is None:
        if cell is None:
            raise ValueError("assert_logprob_parity: pass cell= or tolerance=")
        tolerance = cell.tolerance
    if samples is None:
        samples = engine.generate(requests)
    report = judge_samples(
        requests,
        samples,
        as_reference(reference, model_path),
        token_contexts(engine, requests),
        target=trainer if trainer is not None else engine.logprobs_mode,
        tolerance=tolerance,
        cell=cell.id if cell is not None else "custom",
        engine_description=engine.description,
        trainer_declared=trainer is not None,
        decode=decode,
    )
    if report is None:
        raise ValueError("assert_logprob_parity: the engine returned no samples")
    assert report.passed, report.explain()
    return report
