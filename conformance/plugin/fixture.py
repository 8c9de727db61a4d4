"""The ``parity`` fixture: one object per test and cell, with one way to run, judge and assert.

In the shape of pytest-regressions' fixtures: the suite's tests (and users' own) take ``parity`` and call

* ``parity.check(strategy)``: a hypothesis property over :class:`~conformance.strategies.Case` s: every
  drawn case must pass the contract; shrinking ends at the fewest non-default parameters that fail;
* ``parity.given(**strategies)``: the same machinery for a property with its own arguments;
* ``parity.generate(requests)`` / ``parity.judge(requests, samples)`` / ``parity.run(case)``;
* ``parity.generate_or_report(requests, repro)``: an engine failure ends the test as a finding (xfail
  naming a known finding, else a failure with the engine layer, the log tail and the reproduction);
* ``parity.assert_passed(report)`` / ``parity.assert_paths(comparison)``: fail with the verdict's
  ``explain()`` (helpers hide themselves from tracebacks).

Diagnosis: a check that is about to fail the test (hypothesis' final replay of the minimal failing example,
or a plain test's check) is diagnosed before it is recorded (:mod:`conformance.diagnosis`): the same
requests are re-run with its sampling parameters reset to find the minimal failing set, and with
``--parity-repro-dir`` an upstream reproduction script is written; ``explain()`` and the results record
then carry both. Passing checks, and failing examples hypothesis is still shrinking, cost nothing extra.

Test identity comes from ``request.node`` (the records name the test node; nothing is hand-typed) and
every property gets its own hypothesis example-database key, ``nodeid`` (which includes the cell), so a
failure saved in one test or cell is replayed there and nowhere else.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from conformance.diagnosis import DiagnosisSettings, diagnose, in_final_run
from conformance.engines.base import Engine, EngineFailure, Request, Sample
from conformance.runner import describe_case

if TYPE_CHECKING:
    from hypothesis import strategies as st

    from conformance.matrix import Cell
    from conformance.parity import ParityReport, Target
    from conformance.path_comparison import PathComparison
    from conformance.report.recorder import EngineFailureRecord
    from conformance.runner import ParityRunner
    from conformance.session import PromptSet
    from conformance.spec import SamplingSpec
    from conformance.strategies import Case, Vocabulary

MAX_KNOWN_FINDING_RESTARTS = 2
CASES_PER_EXAMPLE = 4
"""Cases one hypothesis example of :func:`check_cases` draws: sent to the engine in one call (vLLM batches
them, so the per-step cost is shared) and judged one by one. A profile's example count is a count of
cases: ``max_examples = ceil(cases / CASES_PER_EXAMPLE)``."""
"""A property restarts a crashed engine at most this often for *known* findings, then stops sending work."""


def assert_parity(report: ParityReport) -> None:
    """Fail the current test with the report's explanation unless it passed; a failure a known divergence
    finding covers ends the test as ``xfail`` naming the finding (see :mod:`conformance.findings`)."""
    __tracebackhide__ = True
    if not report.passed and report.known:
        pytest.xfail(f"{report.known}; this check: {report.spec.describe()}")
    assert report.passed, report.explain()


def engine_failure_message(record: EngineFailureRecord) -> str:
    text = (
        f"ENGINE FAILURE [layer: engine] in cell {record.cell!r}: {record.reason}\n"
        f"  reproducing params: {record.params}"
    )
    if record.log_tail:
        text += "\n  engine log tail:\n" + "\n".join("    " + line for line in record.log_tail.splitlines())
    return text


def database_key(test: Callable[..., Any], key: str) -> Callable[..., Any]:
    """Give a ``@given`` property its own hypothesis example-database key (hypothesis keys on the inner
    function otherwise, which every property built by the same helper shares); returns ``test``."""
    test.hypothesis.inner_test._hypothesis_internal_add_digest = key.encode()  # type: ignore[attr-defined]
    return test


def diagnose_failure(
    runner: ParityRunner, requests: Sequence[Request], report: ParityReport, diagnosis: DiagnosisSettings, test: str
) -> None:
    """Diagnose ``report`` (see :func:`conformance.diagnosis.diagnose`) if it is a failure no known finding
    covers; a failure of the diagnosis itself becomes a line of the report, never a different error."""
    if report.passed or report.known is not None or not diagnosis.active:
        return
    try:
        diagnose(runner, requests, report, diagnosis, test)
    except Exception as exc:  # noqa: BLE001 - the check's own failure must still be what the test reports
        report.reasons.append(
            f"(diagnosis failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        )


def judge_final(
    runner: ParityRunner,
    requests: Sequence[Request],
    samples: Sequence[Sequence[Sample]],
    test: str,
    diagnosis: DiagnosisSettings,
) -> ParityReport:
    """``runner.judge`` that diagnoses a failure the test will report before the check is recorded (so its
    record carries the diagnosis); any other check is judged and recorded as usual."""
    final = diagnosis.active and in_final_run()
    report = runner.judge(requests, samples, test, record=not final)
    if final:
        diagnose_failure(runner, requests, report, diagnosis, test)
        runner.record(test, report)
    return report


def check_cases(
    runner: ParityRunner,
    cases: st.SearchStrategy[Case],
    settings: Any,
    test: str,
    extra: Callable[[Case, ParityReport], None] | None = None,
    diagnosis: DiagnosisSettings | None = None,
) -> None:
    """Property: for every drawn case the engine agrees with the contract (and ``extra`` holds).

    Each example holds :data:`CASES_PER_EXAMPLE` cases, generated in one engine call and judged one by
    one (the profile's count is of cases; equal cases are judged once); shrinking simplifies the failing
    case and the others to defaults.

    ``test`` names the check in the records and keys hypothesis' example database. An unknown engine
    failure stops the property and fails the test as an engine finding; a known finding (see
    :mod:`conformance.findings`) is recorded with its parameters, the engine restarted and the property
    goes on (at most :data:`MAX_KNOWN_FINDING_RESTARTS` times). ``diagnosis`` (default: on) says what the
    failing example hypothesis reports gets before the test fails (see :func:`judge_final`).
    """
    __tracebackhide__ = True
    from hypothesis import given, note
    from hypothesis import settings as settings_with
    from hypothesis import strategies as st

    diagnosis = diagnosis if diagnosis is not None else DiagnosisSettings()

    failures: list[EngineFailureRecord] = []
    known: list[EngineFailureRecord] = []
    covered: list[ParityReport] = []
    judged = 0
    per_example = max(1, min(CASES_PER_EXAMPLE, settings.max_examples))
    examples = settings_with(settings, max_examples=math.ceil(settings.max_examples / per_example))

    @examples
    @given(batch=st.lists(cases, min_size=per_example, max_size=per_example))
    def property_(batch: list[Case]) -> None:
        nonlocal judged
        if failures or len(known) > MAX_KNOWN_FINDING_RESTARTS:
            return
        batch = list(dict.fromkeys(batch))  # a constant strategy (st.just) is one case, not four copies
        per_case = [runner.requests(case) for case in batch]
        try:
            runner.prefetch_reference_for(samples := runner.generate([r for rs in per_case for r in rs]))
        except EngineFailure as exc:
            record = runner.engine_failure(" + ".join(describe_case(case) for case in batch), exc, test)
            (known if record.known else failures).append(record)
            return
        offset = 0
        for case, requests in zip(batch, per_case, strict=True):
            group, offset = samples[offset : offset + len(requests)], offset + len(requests)
            try:
                report = judge_final(runner, requests, group, test, diagnosis)
            except EngineFailure as exc:  # the diagnosis re-runs the failing case on the engine
                record = runner.engine_failure(describe_case(case), exc, test)
                (known if record.known else failures).append(record)
                return
            judged += 1
            note(report.explain())
            if report.known and not report.passed:
                covered.append(report)  # reported and recorded; not a failure of this property
                continue
            assert report.passed, report.explain()
            if extra is not None:
                extra(case, report)

    database_key(property_, test)()
    if failures:
        pytest.fail(engine_failure_message(failures[0]), pytrace=False)
    if known and not judged:  # a known engine finding stopped every check: xfail, not a pass with no check
        pytest.xfail(
            f"known engine finding {known[0].known} stopped every check of this test: {known[0].reason}; "
            f"reproduce: {known[0].params}"
        )
    if covered:
        pytest.xfail(
            f"{covered[0].known}; {len(covered)} check(s) covered, e.g. {covered[0].spec.describe()} "
            f"[layer: {covered[0].layer}]"
        )


class Parity:
    """The ``parity`` fixture's object: a cell's runner bound to one test node."""

    def __init__(
        self,
        runner: ParityRunner,
        settings: Any,
        vocab: Vocabulary,
        test: str,
        diagnosis: DiagnosisSettings | None = None,
    ) -> None:
        self.runner = runner
        self.diagnosis = diagnosis if diagnosis is not None else DiagnosisSettings()
        """What a failing check gets before the test fails (``--parity-diagnose``, ``--parity-repro-dir``)."""
        self.settings = settings
        """The hypothesis settings of the session's profile."""
        self.vocab = vocab
        self.test = test
        """The test's identity in records and hypothesis' database: its node id (cell included)."""

    # -- what the test works with ----------------------------------------------------------------------
    @property
    def cell(self) -> Cell:
        return self.runner.cell

    @property
    def engine(self) -> Engine:
        """The cell's running engine (started on first use). An engine that cannot start ends the test as
        that engine finding (:meth:`fail_engine`: ``xfail`` when it is a known one)."""
        __tracebackhide__ = True
        try:
            return self.runner.engine
        except EngineFailure as exc:
            self.fail_engine("engine start", exc)

    @property
    def prompts(self) -> PromptSet:
        return self.runner.prompts

    @property
    def target(self) -> Target:
        return self.runner.target

    def max_abs(self, spec: SamplingSpec, target: Target | None = None) -> float:
        """The cell's max |Δ| bound for values computed under ``spec`` and read as ``target`` (default: the
        cell's own logprobs mode, as in engine-versus-itself comparisons), scaled by 1/T below T = 1."""
        from conformance.parity import scaled_tolerance

        return scaled_tolerance(self.cell.tolerance, spec, target or self.cell.logprobs_mode).max_abs

    def fewer(self, divisor: int, minimum: int) -> Any:
        """The profile's settings with ``max_examples // divisor`` examples (at least ``minimum``): for
        focused properties that re-check a corner the main property also draws."""
        from hypothesis import settings

        return settings(self.settings, max_examples=max(minimum, self.settings.max_examples // divisor))

    # -- running and judging ---------------------------------------------------------------------------
    def generate(self, requests: Sequence[Request]) -> list[list[Sample]]:
        return self.runner.generate(requests)

    def judge(self, requests: Sequence[Request], samples: Sequence[Sequence[Sample]]) -> ParityReport:
        """The verdict on ``samples``, recorded under this test; a failure the test will report is
        diagnosed first (see :func:`judge_final`)."""
        return judge_final(self.runner, requests, samples, self.test, self.diagnosis)

    def run(self, case: Case) -> ParityReport:
        requests = self.runner.requests(case)
        return self.judge(requests, self.runner.generate(requests))

    def check(
        self,
        cases: st.SearchStrategy[Case],
        *,
        settings: Any = None,
        extra: Callable[[Case, ParityReport], None] | None = None,
    ) -> None:
        """Every drawn case passes the contract (and ``extra``); see :func:`check_cases`."""
        __tracebackhide__ = True
        check_cases(
            self.runner, cases, settings if settings is not None else self.settings, self.test, extra, self.diagnosis
        )

    def given(self, *, settings: Any = None, **strategies: Any) -> Callable[[Callable[..., None]], Callable[[], None]]:
        """Decorate a property: hypothesis ``@given(**strategies)`` under the profile's (or ``settings``)
        settings, keyed in the example database by this test node; call the result to run it."""
        from hypothesis import given

        chosen = settings if settings is not None else self.settings

        def decorate(fn: Callable[..., None]) -> Callable[[], None]:
            covered: list[str] = []

            @functools.wraps(fn)
            def example(*args: Any, **kwargs: Any) -> None:
                try:
                    fn(*args, **kwargs)
                except pytest.xfail.Exception as exc:  # a check a known finding covers: not a failure to shrink
                    covered.append(str(exc))

            prop = database_key(chosen(given(**strategies)(example)), self.test)

            def run() -> None:
                __tracebackhide__ = True
                prop()
                if covered:
                    pytest.xfail(f"{covered[0]} ({len(covered)} example(s) covered by known findings)")

            return run

        return decorate

    def generate_or_report(self, requests: Sequence[Request], repro: str) -> list[list[Sample]]:
        """Generate; an engine failure ends the test as a finding (see :meth:`fail_engine`)."""
        __tracebackhide__ = True
        try:
            return self.runner.generate(requests)
        except EngineFailure as exc:
            self.fail_engine(repro, exc)

    def fail_engine(self, repro: str, failure: EngineFailure) -> NoReturn:
        """Record ``failure`` and end the test: ``xfail`` naming a known finding, else a failure with the
        engine layer, the reason, the log tail and ``repro`` (how to reproduce it)."""
        __tracebackhide__ = True
        record = self.runner.engine_failure(repro, failure, self.test)
        finding = self.runner.known_finding(failure) if record.known else None
        if finding is not None:
            pytest.xfail(f"known engine finding {finding.id}: {finding.summary}; reproduce: {repro}")
        pytest.fail(engine_failure_message(record), pytrace=False)

    # -- assertions ------------------------------------------------------------------------------------
    @staticmethod
    def assert_passed(report: ParityReport) -> None:
        """See :func:`assert_parity` (xfail for a check a known divergence finding covers)."""
        __tracebackhide__ = True
        assert_parity(report)

    @staticmethod
    def assert_paths(comparison: PathComparison) -> None:
        __tracebackhide__ = True
        assert comparison.passed, comparison.explain()
