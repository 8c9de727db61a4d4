"""Assertion helpers for conformance tests (the suite's and users' own).

:func:`check_cases` runs a hypothesis property over cases against one cell: every example must pass
:func:`~conformance.parity.check_parity`; hypothesis shrinks a failure to its minimal parameters and
the assertion message is the report's explanation. An engine failure (crash, rejected request) is not
shrunk (each try would cost an engine restart): the first one is recorded with its exact parameters,
the property stops sending work to that engine, and the test fails as an *engine* finding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, note
from hypothesis import strategies as st

from conformance.engines.base import EngineFailure, Request, Sample
from conformance.findings import KnownFinding, match_finding
from conformance.parity import ParityReport
from conformance.runner import EngineFailureRecord, ParityRunner, describe_case
from conformance.strategies import Case


def assert_parity(report: ParityReport) -> None:
    """Fail the current test with the report's explanation unless it passed."""
    assert report.passed, report.explain()


def engine_failure_message(record: EngineFailureRecord) -> str:
    text = (
        f"ENGINE FAILURE [layer: engine] in cell {record.cell!r}: {record.reason}\n"
        f"  reproducing params: {record.params}"
    )
    if record.log_tail:
        text += "\n  engine log tail:\n" + "\n".join("    " + line for line in record.log_tail.splitlines())
    return text


def known_finding_for(runner: ParityRunner, failure: EngineFailure) -> KnownFinding | None:
    """The known engine finding this failure is, for the runner's engine and version."""
    from conformance.engines.vllm_offline import vllm_version

    return match_finding(runner.cell.engine, vllm_version(), f"{failure.reason}\n{failure.log_tail}")


MAX_KNOWN_FINDING_RESTARTS = 2
"""A property restarts a crashed engine at most this often for *known* findings, then stops sending work."""


def check_cases(
    runner: ParityRunner,
    cases: st.SearchStrategy[Case],
    settings: Any,
    test: str,
    extra: Callable[[Case, ParityReport], None] | None = None,
) -> None:
    """Property: for every drawn case the engine agrees with the contract (and ``extra`` holds).

    An unknown engine failure stops the property and fails the test as an engine finding. A known
    finding (see :mod:`conformance.findings`) is recorded with its parameters, the engine is restarted
    and the property goes on (at most :data:`MAX_KNOWN_FINDING_RESTARTS` times).
    """
    failures: list[EngineFailureRecord] = []
    known: list[EngineFailureRecord] = []

    @settings
    @given(case=cases)
    def property_(case: Case) -> None:
        if failures or len(known) > MAX_KNOWN_FINDING_RESTARTS:
            return
        try:
            report = runner.run(case, test)
        except EngineFailure as exc:
            finding = known_finding_for(runner, exc)
            record = runner.engine_failure(describe_case(case), exc, test, known=finding.id if finding else None)
            (known if finding else failures).append(record)
            return
        note(report.explain())
        assert_parity(report)
        if extra is not None:
            extra(case, report)

    property_()
    if failures:
        pytest.fail(engine_failure_message(failures[0]), pytrace=False)


def generate_or_report(runner: ParityRunner, requests: list[Request], test: str, repro: str) -> list[list[Sample]]:
    """Generate; an engine failure ends the test as a finding: ``xfail`` naming a known finding, else a
    failure with the engine layer, the reason, the log tail and ``repro`` (how to reproduce it)."""
    try:
        return runner.generate(requests)
    except EngineFailure as exc:
        finding = known_finding_for(runner, exc)
        record = runner.engine_failure(repro, exc, test, known=finding.id if finding else None)
        if finding is not None:
            pytest.xfail(f"known engine finding {finding.id}: {finding.summary}; reproduce: {repro}")
        pytest.fail(engine_failure_message(record), pytrace=False)
