"""pytest-xdist ``--dist loadgroup`` keeps each group in one worker, or the kit says it does not.

The kit tags every cell's tests with ``xdist_group`` (one group per engine configuration) so that a cell's
engine starts once per run. pytest 9.2 silently broke the tagging (pytest-dev/pytest-xdist#1386): the
groups are then spread over the workers and each one starts the same engines. This test runs a grouped
project on two workers: with a pytest that honours the groups (the dev extra pins pytest<9.2) every group
runs in one worker and the kit stays silent; where the groups are ignored, the kit's warning says so.
"""

from __future__ import annotations

import re

import pytest

TESTS = """
import os
import pytest

@pytest.mark.parametrize("i", [pytest.param(i, marks=pytest.mark.xdist_group(f"g{i % 2}")) for i in range(8)])
def test_grouped(i):
    print(f"RAN g{i % 2} on {os.environ['PYTEST_XDIST_WORKER']}")
"""


def test_loadgroup_runs_a_group_in_one_worker_or_warns(pytester: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    pytester.makepyfile(test_groups=TESTS)
    result = pytester.runpytest_subprocess("-p", "conformance.plugin", "-n", "2", "--dist", "loadgroup", "-rP")
    result.assert_outcomes(passed=8)
    out = result.stdout.str()
    workers: dict[str, set[str]] = {}
    for group, worker in re.findall(r"RAN (g\d) on (gw\d)", out):
        workers.setdefault(group, set()).add(worker)
    assert set(workers) == {"g0", "g1"}, out
    if "pytest-xdist --dist loadgroup is ignoring xdist_group" in out:
        assert pytest.version_tuple >= (9, 2), out  # only the pytest that broke the tagging
    else:
        assert all(len(w) == 1 for w in workers.values()), f"groups spread over workers, no warning: {workers}"


def test_each_xdist_worker_binds_its_engines_to_its_own_core() -> None:
    from conformance.plugin import pin_worker_core

    env = {"PYTEST_XDIST_WORKER": "gw1", "PYTEST_XDIST_WORKER_COUNT": "2"}
    assert pin_worker_core(env, cpus=2) == "1" and env["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    assert pin_worker_core({"PYTEST_XDIST_WORKER": "gw0", "PYTEST_XDIST_WORKER_COUNT": "4"}, cpus=2) is None
    assert pin_worker_core({}, cpus=2) is None  # not under xdist
    chosen = {"PYTEST_XDIST_WORKER": "gw0", "PYTEST_XDIST_WORKER_COUNT": "2", "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    assert pin_worker_core(chosen, cpus=2) is None and chosen["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"
