"""Drive one cell's engine and the reference through a case and judge it: the suite's (and users') workhorse.

:class:`ParityRunner` holds a cell's :class:`~conformance.engines.handle.EngineHandle`, its reference and
prompt set; ``run(case)`` sends a case to the engine and judges the samples through the one judge
pipeline (:func:`~conformance.judge.judge_samples`), recording the verdict. Engine failures are recorded
with what reproduces them and whether they are a known finding (:mod:`conformance.findings`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from conformance.engines.base import Engine, EngineFailure, Request, Sample
from conformance.engines.handle import EngineHandle
from conformance.findings import KnownFinding, match_finding
from conformance.judge import judge_samples, token_contexts
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
    ) -> None:
        self.handle = handle
        self.reference = reference
        self.prompts = prompts
        self.trainer = trainer
        self.recorder = recorder
        self.decode = decode

    @property
    def cell(self) -> Cell:
        return self.handle.cell

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

    def generate(self, requests: Sequence[Request]) -> list[list[Sample]]:
        """Engine samples for ``requests`` (raises :class:`EngineFailure`)."""
        return self.engine.generate(requests)

    def judge(
        self, requests: Sequence[Request], samples: Sequence[Sequence[Sample]], test: str = "", reference: Reference | None = None
    ) -> ParityReport:
        """Score the engine's samples with the reference (or ``reference``) and the contract; record it."""
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
        )
        if report is None:
            raise ValueError(f"cell {self.cell.id}: the engine returned no samples to judge")
        if self.recorder is not None:
            self.recorder.add(test, report)
        return report

    def run(self, case: Case, test: str = "") -> ParityReport:
        """Generate the case on the engine, then judge it."""
        requests = self.requests(case)
        return self.judge(requests, self.generate(requests), test)

    def known_finding(self, failure: EngineFailure) -> KnownFinding | None:
        """The known engine finding ``failure`` is, for this engine and version (None: a new failure)."""
        name, version = self.handle.identity()
        return match_finding(name, version, f"{failure.reason}\n{failure.log_tail}")

    def engine_failure(self, params: str, failure: EngineFailure, test: str = "") -> EngineFailureRecord:
        """Record an engine failure; ``params`` says what reproduces it (see :func:`describe_case`)."""
        finding = self.known_finding(failure)
        record = EngineFailureRecord(self.cell.id, params, failure.reason, failure.log_tail, finding.id if finding else None)
        self.handle.failures.append(record)
        if self.recorder is not None:
            self.recorder.add_failure(test, record)
        return record
