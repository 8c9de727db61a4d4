"""Closing one engine kills only its own processes (conformance.engines.vllm_offline.ChildProcesses).

With two engines alive (the session's pool keeps two), the older one's close used to kill every child
process started since *its* start, the younger engine's core and workers included; the younger engine then
died at its next request with nothing in its log (CI: the fp32-processed vs nocache pair and the TP=2 cell).
Here child processes stand in for the engines' processes.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from conformance.engines.vllm_offline import ChildProcesses


def _engine_like() -> subprocess.Popen[bytes]:
    """A child that itself starts a grandchild (an engine core and its worker)."""
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    return subprocess.Popen([sys.executable, "-c", code])


def _wait_for_grandchild(proc: subprocess.Popen[bytes]) -> None:
    import psutil

    for _ in range(100):
        if psutil.Process(proc.pid).children():
            return
        psutil.wait_procs([], timeout=0.05)
    raise AssertionError("the grandchild did not start")


def test_closing_the_older_engine_leaves_the_younger_running() -> None:
    older = ChildProcesses()
    a = _engine_like()
    _wait_for_grandchild(a)
    older.claim()
    younger = ChildProcesses()
    b = _engine_like()
    _wait_for_grandchild(b)
    younger.claim()
    try:
        older.cleanup()
        assert a.wait(timeout=10) is not None
        assert b.poll() is None, "closing the older engine killed the younger one"
        younger.cleanup()
        assert b.wait(timeout=10) is not None
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_failed_start_cleans_up_everything_new() -> None:
    """Before ``claim`` (a start that failed or timed out), everything new since the snapshot goes."""
    children = ChildProcesses()
    a = _engine_like()
    _wait_for_grandchild(a)
    children.cleanup()
    assert a.wait(timeout=10) is not None


def test_closing_an_engine_spares_processes_it_did_not_start() -> None:
    """A process tree started after this engine by something that claims nothing (the server adapter's
    ``vllm serve``) survives this engine's close."""
    engine = ChildProcesses()
    a = _engine_like()
    _wait_for_grandchild(a)
    engine.claim()
    server = _engine_like()
    _wait_for_grandchild(server)
    try:
        engine.cleanup()
        assert a.wait(timeout=10) is not None
        assert server.poll() is None, "closing the engine killed a process tree it did not start"
    finally:
        for proc in (a, server):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_the_shared_zygote_survives_and_its_engine_children_do_not(monkeypatch: pytest.MonkeyPatch) -> None:
    """The zygote (conformance.engines.zygote) starts during the first engine's start and parents every
    engine core: that engine's close kills the engine core it forked, never the zygote."""
    import psutil

    from conformance.engines import zygote

    children = ChildProcesses()
    shared = _engine_like()  # the zygote, and the engine core it forked
    _wait_for_grandchild(shared)
    engine_core = psutil.Process(shared.pid).children()[0]
    real = zygote.shared_pids
    monkeypatch.setattr(zygote, "shared_pids", lambda: real() | {shared.pid})  # keep this session's own zygote
    children.claim()
    try:
        children.cleanup()
        # killed: gone, or a zombie its parent (which here does not reap it, unlike a forkserver) still lists
        gone = not engine_core.is_running() or engine_core.status() == psutil.STATUS_ZOMBIE
        assert gone, "the engine core the zygote forked survived its engine's close"
        assert shared.poll() is None, "closing an engine killed the zygote"
    finally:
        shared.kill()
        shared.wait()
