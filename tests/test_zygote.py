"""The zygote start (conformance.engines.zygote) gives an engine what vLLM's spawn gives it.

The unit tests pin the rules (which environment differences fall back to spawn, how the worker's OpenMP
set-up is read, the switch's values); the engine test starts one CPU cell both ways and asserts bitwise
equal tokens and logprobs, the same worker thread count and cores, and that the zygote start was taken.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conformance.engines import zygote
from conformance.engines.base import Request
from conformance.matrix import Cell
from conformance.spec import SamplingSpec


def test_mode_reads_the_switch() -> None:
    assert zygote.mode({}) == "zygote"
    assert zygote.mode({zygote.ENV_VAR: "Spawn"}) == "spawn"
    with pytest.raises(zygote.ZygoteError, match="PARITY_ENGINE_START='fork': expected one of zygote, spawn"):
        zygote.mode({zygote.ENV_VAR: "fork"})


def test_only_lazily_read_variables_may_differ() -> None:
    base = {"LD_PRELOAD": "libgomp.so", "VLLM_CPU_OMP_THREADS_BIND": "0", "LOCAL_WORLD_SIZE": "1"}
    assert zygote._differences({**base, "VLLM_CPU_OMP_THREADS_BIND": "0|1", "LOCAL_WORLD_SIZE": "2"}, base) == []
    assert zygote._differences({**base, "VLLM_BATCH_INVARIANT": "1"}, base) == ["VLLM_BATCH_INVARIANT"]
    assert zygote._differences({k: v for k, v in base.items() if k != "LD_PRELOAD"}, base) == ["LD_PRELOAD"]


def test_worker_cores_from_vllms_openmp_variables() -> None:
    assert zygote._cpu_set({"GOMP_CPU_AFFINITY": "0 1"}) == {0, 1}
    assert zygote._cpu_set({"OMP_PLACES": "{1}"}) == {1}
    assert zygote._cpu_set({}) is None


REQUESTS = [
    Request((1, 400 + i, 500, 600 + i), SamplingSpec(max_tokens=24, temperature=0.9, top_p=0.95, seed=11 + i))
    for i in range(3)
]
"""Both engines of a comparison get these (seeded: the same tokens each time)."""


def _values(samples: list[Any]) -> list[Any]:
    """What must be bitwise equal between two starts: tokens, sampled logprobs and top-n."""
    return [(s.output_ids, s.sampled_values, s.top_values) for s in samples]


def _worker_threads(worker: Any) -> tuple[int, list[int]]:
    import os

    import torch

    return torch.get_num_threads(), sorted(os.sched_getaffinity(0))


@pytest.mark.selftest
def test_zygote_engine_equals_spawned_engine(
    cpu_cells: dict[str, Cell], bundled_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("vllm")
    from conformance.engines.vllm_offline import VllmOfflineEngine

    runs = {}
    for start in ("spawn", "zygote"):
        monkeypatch.setenv(zygote.ENV_VAR, start)
        engine = VllmOfflineEngine(cpu_cells["fp32-processed"], bundled_model)
        try:
            samples = [s for row in engine.generate(REQUESTS) for s in row]
            runs[start] = (engine.start_mode, engine.collective_rpc(_worker_threads), _values(samples))
        finally:
            engine.close()
    assert runs["spawn"][0].startswith("spawn")
    assert runs["zygote"][0] == "zygote", runs["zygote"][0]
    assert runs["zygote"][1] == runs["spawn"][1], "worker threads / cores differ from a spawned worker's"
    assert runs["zygote"][2] == runs["spawn"][2], "a zygote-started engine returned other tokens or logprobs"


@pytest.mark.selftest
def test_forked_server_equals_spawned_server(
    cpu_cells: dict[str, Cell], bundled_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``vllm serve`` under conformance.engines.forked_serve (engine core and worker forked) answers what
    the server with vLLM's spawned processes answers."""
    pytest.importorskip("vllm")
    from conformance.engines.vllm_server import VllmServerEngine

    runs = {}
    for start in ("spawn", "zygote"):
        monkeypatch.setenv(zygote.ENV_VAR, start)
        engine = VllmServerEngine(cpu_cells["fp32-processed-server"], bundled_model)
        try:
            # one request at a time: concurrent requests batch differently from run to run
            samples = [s for request in REQUESTS for row in engine.generate([request]) for s in row]
            runs[start] = _values(samples)
            log = engine.log_tail(400)
        finally:
            engine.close()
        assert ("engine processes start by fork" in log) == (start == "zygote"), log
    assert runs["zygote"] == runs["spawn"], "the forked server returned other tokens or logprobs"


def test_a_zygote_killed_and_reaped_elsewhere_is_started_anew() -> None:
    """A cleanup that kills and waits on the zygote leaves the stdlib's forkserver unable to check on it
    (ChildProcessError); the next engine start forgets it and starts a new one."""
    import os
    import signal

    first = zygote._ensure_zygote()
    assert first is not None
    os.kill(first, signal.SIGKILL)
    os.waitpid(first, 0)  # reaped here, as psutil.wait_procs does in an engine's cleanup
    second = zygote._ensure_zygote()
    assert second is not None and second != first
