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

from conformance.engines.base import EngineFailure
from conformance.parity import ParityReport
from conformance.runner import EngineFailureRecord, ParityRunner
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


def check_cases(
    runner: ParityRunner,
    cases: st.SearchStrategy[Case],
    settings: Any,
    test: str,
    extra: Callable[[Case, ParityReport], None] | None = None,
) -> None:
    """Property: for every drawn case the engine agrees with the contract (and ``extra`` holds)."""
    failures: list[EngineFailureRecord] = []

    @settings
    @given(case=cases)
    def property_(case: Case) -> None:
        if failures:
            return
        try:
            report = runner.run(case, test)
        except EngineFailure as exc:
            failures.append(runner.engine_failure(case, exc, test))
            return
        note(report.explain())
        assert_parity(report)
        if extra is not None:
            extra(case, report)

    property_()
    if failures:
        pytest.fail(engine_failure_message(failures[0]), pytrace=False)
