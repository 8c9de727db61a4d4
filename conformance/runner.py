"""Drive one cell's engine and the reference through a case and judge it: the suite's (and users') workhorse.

:class:`ParityRunner` holds a cell's :class:`~conformance.engines.handle.EngineHandle`, its reference and
prompt set; ``run(case)`` sends a case to the engine and judges the samples through the one judge
pipeline (:func:`~conformance.judge.judge_samples`), recording the verdict. Engine failures are recorded
with what reproduces them and whether they are a known finding (:mod:`conformance.findings`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from conformance.engines.base import Engine, EngineFailure, Request, Sample
from conformance.engines.handle import EngineHandle
from conformance.findings import KnownFinding, covering_finding, match_finding
from conformance.judge import judge_samples, token_contexts
from conformance.reference import ReferenceCache
from conformance.report.recorder import EngineFailureRecord, Recorder
from conformance.spec import TrainerSemantics

if TYPE_CHECKING:
    from conformance.matrix import Cell
    from conformance.parity import ParityReport, Target
    from conformance.session import PromptSet
    from conformance.strategies import Case
    from conformance.trainer import Reference


def describe_case(case: Case) -> str:
    """What reproduces a case: its prompt indices (``[12]*206`` for one prompt repeated) and spec."""
    prompts = case.prompts
    listed = f"[{prompts[0]}]*{len(prompts)}" if len(prompts) > 8 and len(set(prompts)) == 1 else str(list(prompts))
    return f"prompts={listed} {case.spec.describe()}"


class ParityRunner:
    """Runs cases for one cell against the reference and judges them."""

    def __init__(
        self,
        handle: EngineHandle,
        reference: Reference,
        prompts: PromptSet,
        trainer: TrainerSemantics | None = None,
        recorder: Recorder | None = None,
        decode: Callable[[int], str] | None = None,
        cell: Cell | None = None,
        findings: list[KnownFinding] | None = None,
    ) -> None:
        self.handle = handle
        self._cell = cell
        self.findings = findings
        """Known findings to recognise (None: the kit's own, ``fixtures/known_findings.toml``)."""
        self.seconds: dict[str, float] = {"generate": 0.0, "reference": 0.0, "contract": 0.0}
        """Wall time this runner spent in the engine (``generate``), the reference and the contract."""
        self.reference: Reference = ReferenceCache(reference)
        """The reference, behind a small cache (a batch is scored in one forward, then judged case by case)."""
        self.prompts = prompts
        self.trainer = trainer
        self.recorder = recorder
        self.decode = decode
        self._blocked_records: dict[str, EngineFailureRecord] = {}
        """Per test, its record of the blocked engine (recorded once per test)."""

    def timings(self) -> dict[str, float]:
        """The running totals of :attr:`seconds` plus the engine's start time (``engine_start``)."""
        return {**self.seconds, "engine_start": self.handle.start_seconds}

    @property
    def cell(self) -> Cell:
        """The cell judged (the handle's own unless given: a pooled engine may serve several cells)."""
        return self._cell if self._cell is not None else self.handle.cell

    @property
    def engine(self) -> Engine:
        """The cell's running engine (started on first use; raises :class:`EngineFailure`)."""
        return self.handle.engine

    @property
    def target(self) -> Target:
        """What the values are judged as: the declared trainer, else the cell's own logprobs mode."""
        return self.trainer if self.trainer is not None else self.cell.logprobs_mode

    def requests(self, case: Case) -> list[Request]:
        return [Request(self.prompts.ids[i], case.spec) for i in case.prompts]

    def prefetch_reference_for(self, samples: Sequence[Sequence[Sample]]) -> None:
        """Score every sample's tokens with the reference in one call (judging them later reads the cache)."""
        started = time.perf_counter()
        self.reference.raw_logits([(s.prompt_ids, s.output_ids) for group in samples for s in group])
        self.seconds["reference"] += time.perf_counter() - started

    def generate(self, requests: Sequence[Request]) -> list[list[Sample]]:
        """Engine samples for ``requests`` (raises :class:`EngineFailure`)."""
        engine = self.engine  # started (and timed as a start) before generation is timed
        started = time.perf_counter()
        try:
            samples = engine.generate(requests)
            rows = sum(len(group) for group in samples)
            batch = frozenset(name for request in requests for name in request.spec.to_kwargs())
            for group in samples:
                for sample in group:
                    sample.batch_rows, sample.batch_fields = rows, batch
            return samples
        finally:
            self.seconds["generate"] += time.perf_counter() - started

    def judge(
        self,
        requests: Sequence[Request],
        samples: Sequence[Sequence[Sample]],
        test: str = "",
        reference: Reference | None = None,
        *,
        record: bool = True,
    ) -> ParityReport:
        """Score the engine's samples with the reference (or ``reference``) and the contract; record it
        (``record=False``: the caller records it later with :meth:`record`, or never, as for the re-runs
        of a diagnosis)."""
        engine = self.engine
        report = judge_samples(
            requests,
            samples,
            reference if reference is not None else self.reference,
            token_contexts(engine, requests),
            target=self.target,
            tolerance=self.cell.tolerance,
            cell=self.cell.id,
            engine_description=engine.description,
            trainer_declared=self.trainer is not None,
            decode=self.decode,
            seconds=self.seconds,
        )
        if report is None:
            raise ValueError(f"cell {self.cell.id}: the engine returned no samples to judge")
        if not report.passed:
            name, version = self.handle.identity()
            # the engine call's rows (a check's cases are generated together with the other cases of its batch)
            rows = max([sum(len(group) for group in samples)] + [s.batch_rows or 0 for g in samples for s in g])
            batch = frozenset(report.spec.to_kwargs()).union(*(s.batch_fields for g in samples for s in g))
            env = frozenset(f"{key}={value}" for key, value in self.cell.env.items())
            finding = covering_finding(
                name, version, report.spec, self.cell.tier, rows, self.findings, batch=batch, env=env
            )
            report.known = finding.explanation if finding is not None else None
        if record:
            self.record(test, report)
        return report

    def record(self, test: str, report: ParityReport) -> None:
        """Keep ``report`` in the session's records (the summary table and ``--parity-results``)."""
        if self.recorder is not None:
            self.recorder.add(test, report)

    def run(self, case: Case, test: str = "", *, record: bool = True) -> ParityReport:
        """Generate the case on the engine, then judge it (see :meth:`judge` for ``record``)."""
        requests = self.requests(case)
        return self.judge(requests, self.generate(requests), test, record=record)

    def known_finding(self, failure: EngineFailure) -> KnownFinding | None:
        """The known engine finding ``failure`` is, for this engine and version (None: a new failure); matched
        against the reason and everything the engine printed during the failed call (:attr:`EngineFailure.log`)."""
        name, version = self.handle.identity()
        return match_finding(name, version, failure.finding_text, self.findings)

    def engine_failure(self, params: str, failure: EngineFailure, test: str = "") -> EngineFailureRecord:
        """Record an engine failure; ``params`` says what reproduces it (see :func:`describe_case`). A known
        finding marked ``fatal`` blocks the handle (no restart: later checks fail at once with the same
        finding); a test that meets the blocked engine again is recorded once."""
        finding = self.known_finding(failure)
        blocked = failure is self.handle.blocked
        if blocked and test in self._blocked_records:
            return self._blocked_records[test]
        record = EngineFailureRecord(
            self.cell.id, params, failure.reason, failure.log_tail, finding.id if finding else None
        )
        if blocked:
            self._blocked_records[test] = record
        elif finding is not None and finding.fatal:
            self.handle.block(failure)
        self.handle.failures.append(record)
        if self.recorder is not None:
            self.recorder.add_failure(test, record)
        return record
