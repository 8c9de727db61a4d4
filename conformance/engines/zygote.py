"""vLLM CPU engines started from a pre-imported zygote instead of two fresh interpreters.

vLLM's CPU platform starts every engine with ``spawn``: the engine-core process and then its worker each
import vLLM, torch and transformers anew, about 11 and 14 CPU-seconds per engine on the 2-core CI machine,
where loading the model takes 0.1 s. With :func:`install`, an offline engine's engine-core process is forked
from a :mod:`multiprocessing` forkserver that imported them once per pytest process (the zygote), and the
engine core forks its worker (vLLM's own ``fork`` path, its default on GPUs). The code, the configuration
and the environment the engine runs with stay what ``spawn`` gives it:

* the engine core runs with the parent's ``os.environ`` as of ``Process.start()``, and the zygote is used
  only when that environment equals the one the zygote imported vLLM under, except for the variables vLLM
  reads when an engine starts, never at import (:data:`LAZY_ENV`); any other difference (a cell's
  ``VLLM_BATCH_INVARIANT``, say) starts that engine with vLLM's ``spawn``, unchanged;
* the engine core writes to the file descriptors 1 and 2 the parent had at ``start()`` (the engine log);
* the worker's OpenMP set-up, which vLLM hands a spawned worker as environment variables that libgomp reads
  when it loads (``OMP_NUM_THREADS``, ``GOMP_CPU_AFFINITY``), is applied with ``torch.set_num_threads`` and
  ``os.sched_setaffinity`` (the same thread count and core set: ``tests/test_zygote.py``).

Measured (docs/profile-cpu.md): logprobs bitwise equal to a spawned engine's; an engine start 21-24 s →
3.4-4.2 s once the zygote has imported (its first start ~12 s, once per process). ``PARITY_ENGINE_START=spawn``
keeps vLLM's own start. Only the CPU platform is touched: a GPU engine core initialises CUDA, which must not
be forked, and vLLM's GPU workers already fork.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import multiprocessing.process
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

ENV_VAR = "PARITY_ENGINE_START"
MODES = ("zygote", "spawn")

PRELOAD = (
    "vllm.v1.engine.core",
    "vllm.v1.executor.multiproc_executor",
    "vllm.v1.worker.cpu_worker",
    "vllm.v1.worker.cpu_model_runner",
    "vllm.model_executor.models.llama",
    "vllm.model_executor.models.qwen2",
    "conformance.engines.zygote",
)
"""What the zygote imports before it forks anything (an import that fails is left to the engine)."""

LAZY_ENV = frozenset(
    {
        "VLLM_CPU_OMP_THREADS_BIND",  # read by OMPProcessManager when the executor starts its workers
        "VLLM_CPU_KVCACHE_SPACE",  # read by the CPU platform's config check and the worker's cache sizing
        "LOCAL_WORLD_SIZE",  # the CPU platform's tensor-parallel size, for torch.distributed at init
        "PYTEST_CURRENT_TEST",  # pytest's own bookkeeping, not vLLM's
        ENV_VAR,  # the kit's own switch
    }
)
"""Variables that may differ between the zygote and an engine it starts: vLLM 0.32 reads them only after
the engine core has started (from ``os.environ``, which the child sets to the parent's)."""


class ZygoteError(ValueError):
    """``PARITY_ENGINE_START`` holds something other than :data:`MODES`."""


def mode(environ: Mapping[str, str] = os.environ) -> str:
    """``zygote`` (the default) or ``spawn``, from ``PARITY_ENGINE_START``."""
    value = environ.get(ENV_VAR, "").strip().lower() or "zygote"
    if value not in MODES:
        raise ZygoteError(f"{ENV_VAR}={environ.get(ENV_VAR)!r}: expected one of {', '.join(MODES)}")
    return value


# -- in the children --------------------------------------------------------------------------------------
def _reopen_stdio(targets: tuple[str, str]) -> None:
    import sys

    for fd, path in zip((1, 2), targets, strict=True):
        stream = sys.stdout if fd == 1 else sys.stderr
        if stream is not None:
            stream.flush()
        try:
            new = os.open(path, os.O_WRONLY | os.O_APPEND)
        except OSError:
            continue  # keep the zygote's
        os.dup2(new, fd)
        os.close(new)


def _engine_core_main(
    env: dict[str, str], stdio: tuple[str, str], target: Callable[..., Any], args: Any, kwargs: Any
) -> Any:
    """The engine-core process (a child of the zygote): the parent's environment and output, then vLLM."""
    os.environ.clear()
    os.environ.update(env)
    _reopen_stdio(stdio)
    return _forked_engine_core_main(target, args, kwargs)


def _forked_engine_core_main(target: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    """An engine core that forks its workers (it has imported everything they need)."""
    import vllm.v1.executor.multiproc_executor as executor

    executor.get_mp_context = lambda: _WORKER_CONTEXT
    return target(*args, **kwargs)


def _cpu_set(environ: Mapping[str, str]) -> set[int] | None:
    """The cores vLLM's OpenMP set-up gives a worker (GOMP_CPU_AFFINITY '0 1', or OMP_PLACES '{0,1}')."""
    gomp = environ.get("GOMP_CPU_AFFINITY", "").split()
    if gomp:
        return {int(c) for c in gomp}
    places = environ.get("OMP_PLACES", "").strip("{}")
    return {int(c) for c in places.split(",")} if places else None


def _worker_main(target: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    """A worker forked from the engine core: apply the OpenMP environment vLLM set for it, then run it."""
    cores = _cpu_set(os.environ)
    if cores:
        os.sched_setaffinity(0, cores)
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit():
        import torch

        torch.set_num_threads(int(threads))
    return target(*args, **kwargs)


# -- the process classes vLLM is handed --------------------------------------------------------------------
def _stdio_targets() -> tuple[str, str]:
    out = []
    for fd in (1, 2):
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            path = ""
        usable = path.startswith("/") and not path.endswith(" (deleted)") and os.path.exists(path)
        out.append(path if usable else f"/proc/{os.getpid()}/fd/{fd}")
    return out[0], out[1]


def _run_instead(process: multiprocessing.process.BaseProcess, runner: Callable[..., Any], *front: Any) -> None:
    """Make ``process`` run ``runner(*front, target, args, kwargs)`` instead of its own target."""
    state = vars(process)
    state["_args"] = (*front, state["_target"], state["_args"], state["_kwargs"])
    state["_target"], state["_kwargs"] = runner, {}


class _EngineCoreProcess(multiprocessing.context.ForkServerProcess):
    def start(self) -> None:
        _run_instead(self, _engine_core_main, dict(os.environ), _stdio_targets())
        super().start()


class _ForkedEngineCoreProcess(multiprocessing.context.ForkProcess):
    def start(self) -> None:
        _run_instead(self, _forked_engine_core_main)
        super().start()


class _WorkerProcess(multiprocessing.context.ForkProcess):
    def start(self) -> None:
        _run_instead(self, _worker_main)
        super().start()


class _EngineCoreContext(multiprocessing.context.ForkServerContext):
    Process = _EngineCoreProcess


class _ForkedEngineCoreContext(multiprocessing.context.ForkContext):
    Process = _ForkedEngineCoreProcess


class _WorkerContext(multiprocessing.context.ForkContext):
    Process = _WorkerProcess


_ENGINE_CONTEXT = _EngineCoreContext()
_FORKED_ENGINE_CONTEXT = _ForkedEngineCoreContext()
_WORKER_CONTEXT = _WorkerContext()

# -- in the parent ----------------------------------------------------------------------------------------
_lock = threading.Lock()
_zygote: dict[int, dict[str, str]] = {}
"""zygote pid -> the environment it imported vLLM under."""
_installed: dict[str, Any] = {}


def zygote_pid() -> int | None:
    """The zygote's pid while it runs."""
    pid = getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None)
    return pid if isinstance(pid, int) else None


def shared_pids() -> set[int]:
    """Helper processes every engine of this process uses (the zygote, multiprocessing's resource tracker),
    started during whichever engine start first needed them: an engine's process bookkeeping must not
    claim them, or its close kills them under the others."""
    from multiprocessing import resource_tracker

    pids = {zygote_pid(), getattr(resource_tracker._resource_tracker, "_pid", None)}
    return {pid for pid in pids if isinstance(pid, int)}


def _differences(env: Mapping[str, str], zygote: Mapping[str, str]) -> list[str]:
    keys = (set(env) | set(zygote)) - LAZY_ENV
    return sorted(k for k in keys if env.get(k) != zygote.get(k))


def _ensure_zygote() -> int | None:
    """Start the zygote under the current environment, or restart it when it died; its pid (None: it
    cannot run here, and engines are spawned). The stdlib's own check raises ChildProcessError when the
    zygote was killed and reaped by someone else (a cleanup that waited on it): forget it and start anew."""
    server = multiprocessing.forkserver._forkserver
    for _ in range(2):
        try:
            multiprocessing.forkserver.ensure_running()
            return zygote_pid()
        except ChildProcessError:
            alive_fd = getattr(server, "_forkserver_alive_fd", None)
            if isinstance(alive_fd, int):
                with contextlib.suppress(OSError):
                    os.close(alive_fd)
            server._forkserver_address = None  # type: ignore[attr-defined]
            server._forkserver_alive_fd = None  # type: ignore[attr-defined]
            server._forkserver_pid = None  # type: ignore[attr-defined]
        except OSError:
            return None
    return None


def _choose_context(spawn_context: Callable[[], Any]) -> Any:
    """vLLM's ``get_mp_context`` for the engine core: the zygote when the environment allows it."""
    with _lock:
        if mode() == "spawn":
            _installed["last"] = f"spawn ({ENV_VAR}=spawn)"
            return spawn_context()
        env = dict(os.environ)
        pid = _ensure_zygote()
        differences = _differences(env, _zygote.setdefault(pid, env)) if pid is not None else ["no zygote"]
        _installed["last"] = f"spawn (differs from the zygote: {', '.join(differences)})" if differences else "zygote"
        return spawn_context() if differences else _ENGINE_CONTEXT


def last_start() -> str:
    """How the last engine core this process started began: ``zygote``, or ``spawn (why)``."""
    return str(_installed.get("last", "spawn"))


def _cpu_engine_utils() -> tuple[Any, str]:
    """vLLM's ``vllm.v1.engine.utils`` when this vLLM and platform allow the zygote, else (None, why)."""
    try:
        import vllm.v1.engine.utils as engine_utils
        import vllm.v1.executor.multiproc_executor as executor
        from vllm.platforms import current_platform
    except ImportError as exc:
        return None, f"spawn (this vLLM lacks {exc.name})"
    if not current_platform.is_cpu():
        return None, "spawn (not vLLM's CPU platform)"
    if not hasattr(engine_utils, "get_mp_context") or not hasattr(executor, "get_mp_context"):
        return None, "spawn (this vLLM starts its processes another way)"
    return engine_utils, "zygote"


def install_fork() -> str:
    """For a process that runs one vLLM server (``vllm serve``, see :mod:`conformance.engines.forked_serve`):
    its engine core is forked from it, and the workers from the engine core, instead of spawned. The
    server process has imported vLLM and run no OpenMP region yet, and a fork inherits its environment and
    output exactly. Returns ``fork`` or ``spawn (why)``."""
    if mode() == "spawn":
        return f"spawn ({ENV_VAR}=spawn)"
    engine_utils, why = _cpu_engine_utils()
    if engine_utils is None:
        return why
    engine_utils.get_mp_context = lambda: _FORKED_ENGINE_CONTEXT
    return "fork"


def install() -> str:
    """Route this process's vLLM CPU engine-core starts through the zygote; returns how engines start now
    (``zygote``, or ``spawn`` with the reason when this vLLM or platform does not allow it)."""
    if mode() == "spawn":
        return f"spawn ({ENV_VAR}=spawn)"
    with _lock:
        if "engine_utils" in _installed:
            return "zygote"
        engine_utils, why = _cpu_engine_utils()
        if engine_utils is None:
            return why
        spawn_context = engine_utils.get_mp_context
        multiprocessing.forkserver.set_forkserver_preload(list(PRELOAD))
        _installed["engine_utils"] = spawn_context
        engine_utils.get_mp_context = lambda: _choose_context(spawn_context)
    return "zygote"
