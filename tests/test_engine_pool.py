"""The session's engine pool stops the engine needed latest, and pairs run right after their cells."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conformance.session import EnginePool


class FakeHandle:
    def __init__(self, key: str, log: list[str]) -> None:
        self.key, self.log, self.started = key, log, False

    def start(self) -> FakeHandle:
        if not self.started:
            self.log.append(self.key)
            self.started = True
        return self

    def close(self) -> None:
        self.started = False


def run(pool: EnginePool, demands: list[frozenset[str]], *, planned: bool = False) -> list[str]:
    """Drive ``pool`` through the tests' demands (telling it the plan if ``planned``); the engine starts in order."""
    starts: list[str] = []
    handles: dict[str, FakeHandle] = {}
    now = [0]
    if planned:
        pool.plan(demands, lambda: now[0])
    for position, keys in enumerate(demands):
        now[0] = position
        for key in sorted(keys):
            handle = pool.get(key, lambda k=key: handles.setdefault(k, FakeHandle(k, starts)))  # type: ignore[misc, arg-type]
            handle.start()  # type: ignore[attr-defined]
    return starts


def plenty() -> int:
    return 1 << 50


DEMANDS = [frozenset(d) for d in ("A", "A", "B", "C", "C", "AC", "D", "AD")]
"""Cell A's tests, B's, C's, the pair A-C, D's, the pair A-D (the CPU matrix's shape: fp32-processed pairs
with the chunked, no-cache and TP=2 cells)."""


def test_without_a_plan_the_least_recently_used_engine_stops() -> None:
    assert run(EnginePool(alive=2, available=plenty), DEMANDS) == ["A", "B", "C", "A", "D", "A"]


def test_with_a_plan_the_engine_needed_latest_stops() -> None:
    pool = EnginePool(alive=2, available=plenty)
    assert run(pool, DEMANDS, planned=True) == ["A", "B", "C", "D"]  # B and C (never needed again) make way, not A


def test_pairs_run_after_the_last_test_of_their_cells(pytester: pytest.Pytester) -> None:
    """A test driving two cells' engines moves behind the last test of the cell it meets last."""
    from conformance.bundled import CPU_MATRIX

    pytester.makeconftest("pytest_plugins = ['conformance.plugin']")
    pytester.makepyfile(
        test_order="""
import pytest
from conformance.matrix import load_matrix
from conformance.bundled import CPU_MATRIX

pytestmark = pytest.mark.parity
CELLS = {c.id: c for c in load_matrix(CPU_MATRIX)}

@pytest.mark.parametrize("pair", [(CELLS["fp32-processed"], CELLS["fp32-raw"])], ids=["pair"])
def test_pair(pair):
    pass

def test_one(cell):
    pass
"""
    )
    result = pytester.runpytest(
        "--collect-only", "-q", "--parity-matrix", str(CPU_MATRIX), "--parity-cells", "fp32-processed,fp32-raw"
    )
    lines = [line for line in result.outlines if "::" in line]
    assert lines == [
        "test_order.py::test_one[fp32-processed]",
        "test_order.py::test_one[fp32-raw]",
        "test_order.py::test_pair[pair]",
    ], lines


def test_a_marker_names_the_other_engines_a_test_drives(tmp_path: Path) -> None:
    from conformance.bundled import CPU_MATRIX
    from conformance.matrix import load_matrix
    from conformance.plugin import test_cells

    cells = load_matrix(CPU_MATRIX)

    class Item:
        callspec = type("CallSpec", (), {"params": {"cell": cells[0], "where": "short"}})()

        def get_closest_marker(self, name: str) -> Any:
            return pytest.mark.parity_engines.with_args(lambda selected, own: [selected[1]]).mark

    assert [c.id for c in test_cells(Item(), cells)] == [cells[0].id, cells[1].id]  # type: ignore[arg-type]


def test_idle_engines_make_way_when_memory_is_short() -> None:
    """Before an engine starts, idle engines are stopped (the one needed latest first) until START_MEMORY is
    free, even below the ``alive`` count."""
    from conformance.session import START_MEMORY

    free = {"bytes": 10 * START_MEMORY}
    pool = EnginePool(alive=3, available=lambda: free["bytes"])
    starts: list[str] = []
    handles: dict[str, FakeHandle] = {}

    def use(key: str) -> FakeHandle:
        handle = pool.get(key, lambda: handles.setdefault(key, FakeHandle(key, starts)))  # type: ignore[arg-type, return-value]
        return handle.start()  # type: ignore[attr-defined, no-any-return]

    use("A")
    use("B")
    free["bytes"] = START_MEMORY // 2  # short of memory: C's start stops the idle engines first
    use("C")
    assert [k for k, h in handles.items() if h.started] == ["C"]
    free["bytes"] = 10 * START_MEMORY
    use("A")
    assert [k for k, h in handles.items() if h.started] == ["A", "C"]


def test_an_xdist_worker_keeps_two_engines_alive_by_default() -> None:
    from conformance.plugin.options import default_engines_alive

    assert default_engines_alive({}) == "3"
    assert default_engines_alive({"PYTEST_XDIST_WORKER": "gw1"}) == "2"
