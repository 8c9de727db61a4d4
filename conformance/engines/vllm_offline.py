"""vLLM offline engine (``vllm.LLM``) for one matrix cell.

The engine core runs in its own process (vLLM's default), so an engine crash is contained: it surfaces
here as :class:`~conformance.engines.base.EngineFailure` with the engine's log tail, and the cell's
fixture can start a fresh engine for the next test. The engine process writes its log to a file
(``log_path``) for its whole life; :meth:`VllmOfflineEngine.log_tail` reads its end (what failure messages
show), and a failure also carries everything printed during the failed call (``EngineFailure.log``, what
known findings are matched against).
"""

from __future__ import annotations

import contextlib
import gc
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from conformance.engines import zygote
from conformance.engines.base import EngineFailure, Request, Sample
from conformance.engines.vllm_common import cell_env, log_size, read_since, read_tail, root_cause, summary, vllm_version
from conformance.matrix import Cell
from conformance.spec import LogprobsMode, SamplingSpec, TokenContext


@contextlib.contextmanager
def _environment(overlay: Mapping[str, str]) -> Iterator[None]:
    """Set ``overlay`` in ``os.environ`` (a value of '' unsets the variable), restoring it afterwards."""
    saved = {k: os.environ.get(k) for k in overlay}
    for key, value in overlay.items():
        if value == "":
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


@contextlib.contextmanager
def _fds_to(path: Path) -> Iterator[None]:
    """Point fds 1 and 2 at ``path`` (inherited by processes spawned meanwhile), then restore."""
    with open(path, "ab", buffering=0) as log:
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _child_pids() -> list[int]:
    """This process's descendants, less the helpers all engines share (zygote.shared_pids)."""
    import psutil  # a vLLM dependency

    shared = zygote.shared_pids()
    return [p.pid for p in psutil.Process().children(recursive=True) if p.pid not in shared]


def _kill(pids: Sequence[int]) -> None:
    import psutil

    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            proc.kill()
            procs.append(proc)
    psutil.wait_procs(procs, timeout=10)


class ChildProcesses:
    """The processes one engine adds to this process's tree, to kill what it leaves behind on close.

    Made just before the engine starts (a snapshot of the children already there) and :meth:`claim` ed
    once it has started: the children its start created. :meth:`cleanup` then kills only those and their
    descendants. Before a claim (a start that failed or timed out; starts are sequential) it kills every
    child that is new since the snapshot, except other engines' claimed processes. Killing "everything new
    since my start" on close, as before, killed the engines started after this one (another pooled
    offline engine, a ``vllm serve`` process tree), which then died at their next request with
    ``EngineDeadError`` and nothing in their log.
    """

    _claimed: ClassVar[dict[int, set[int]]] = {}
    """id(ChildProcesses) -> the child pids that instance's engine start created (live engines only)."""

    def __init__(self) -> None:
        self.before = set(_child_pids())

    def claim(self) -> None:
        """Record the children the start created (call once the engine runs)."""
        self._claimed[id(self)] = set(_child_pids()) - self.before - self._others()

    def _others(self) -> set[int]:
        return {pid for key, pids in self._claimed.items() if key != id(self) for pid in pids}

    def leftover(self) -> list[int]:
        """This engine's processes still alive (see the class docstring for which those are)."""
        import psutil

        mine = self._claimed.get(id(self))
        others = self._others()
        shared = zygote.shared_pids()
        out = []
        for proc in psutil.Process().children(recursive=True):
            if proc.pid in shared:
                continue
            with contextlib.suppress(psutil.Error):
                lineage = ({proc.pid} | {parent.pid for parent in proc.parents()}) - shared
                if mine is not None:
                    if lineage & mine:
                        out.append(proc.pid)
                elif proc.pid not in self.before and not lineage & others:
                    out.append(proc.pid)
        return out

    def cleanup(self) -> None:
        """Kill :meth:`leftover` and forget the claim."""
        leftover = self.leftover()
        if leftover:
            _kill(leftover)
        self._claimed.pop(id(self), None)


SHUTDOWN_TIMEOUT_S = 1.0
"""How long ``close()`` lets the engine core exit on SIGTERM before it is killed (vLLM's default is 5 s,
which an engine whose state the kit throws away anyway does not need)."""


class VllmOfflineEngine:
    """A ``vllm.LLM`` started for ``cell`` on the model directory ``model_path``."""

    def __init__(self, cell: Cell, model_path: Path, log_dir: Path | None = None) -> None:
        self.cell = cell
        self.model_path = model_path
        self.log_path = Path(tempfile.mkstemp(prefix=f"vllm-{cell.id}-", suffix=".log", dir=log_dir)[1])
        self.dead = False
        self.start_mode = "spawn"
        """How the engine's processes started (conformance.engines.zygote)."""
        self._llm: Any = None
        self._children = ChildProcesses()
        # The cell's environment stays set for the engine's whole life: vLLM reads some variables lazily
        # in this process too (VLLM_ALLOW_INSECURE_SERIALIZATION decides how utility results decode; an
        # engine started with it and read without it hangs on the first collective_rpc/reset call).
        self._env_scope = contextlib.ExitStack()
        self._env_scope.enter_context(_environment(cell_env(cell)))
        try:
            self._start()
        except BaseException:
            self._env_scope.close()
            raise

    # -- life cycle -----------------------------------------------------------------------------------
    def _start(self) -> None:
        try:
            import vllm  # noqa: F401
        except ImportError as exc:
            raise EngineFailure(f"cell {self.cell.id}: vLLM is not importable ({exc})") from None
        installed = zygote.install() if self.cell.tier == "cpu" else "spawn"
        result: dict[str, Any] = {}

        def construct() -> None:
            try:
                from vllm import LLM

                result["llm"] = LLM(model=str(self.model_path), **self.cell.engine_kwargs())
            except BaseException as exc:  # noqa: BLE001 - reported as the engine's failure
                result["error"] = exc

        with _fds_to(self.log_path):
            thread = threading.Thread(target=construct, name=f"start-{self.cell.id}", daemon=True)
            thread.start()
            thread.join(self.cell.start_timeout_s)
            if thread.is_alive():
                self._children.cleanup()
                thread.join(30)
                raise EngineFailure(
                    f"cell {self.cell.id}: engine start exceeded {self.cell.start_timeout_s:.0f} s",
                    self.log_tail(),
                    read_since(self.log_path, 0),
                )
        if "error" in result:
            error = result["error"]
            first = summary(error)
            self._cleanup_processes()
            tail = self.log_tail()
            cause = root_cause(tail)
            raise EngineFailure(
                f"cell {self.cell.id}: vLLM rejected or failed to start the engine: {type(error).__name__}: {first}"
                + (f" (root cause: {cause})" if cause and cause not in first else ""),
                tail,
                read_since(self.log_path, 0),
            )
        self._llm = result["llm"]
        self._children.claim()
        self.start_mode = zygote.last_start() if installed == "zygote" else installed

    def log_tail(self, lines: int = 25) -> str:
        return read_tail(self.log_path, lines)

    def _cleanup_processes(self) -> None:
        gc.collect()
        self._children.cleanup()

    def close(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown(timeout=SHUTDOWN_TIMEOUT_S)
            del llm
        self._cleanup_processes()
        self._env_scope.close()

    # -- engine protocol ------------------------------------------------------------------------------
    name = "vllm"

    @classmethod
    def engine_version(cls) -> str | None:
        """The installed vLLM's version (also before an engine is started)."""
        return vllm_version()

    @property
    def version(self) -> str | None:
        return vllm_version()

    @property
    def logprobs_mode(self) -> LogprobsMode:
        return self.cell.logprobs_mode

    @property
    def description(self) -> str:
        start = f", zygote start: {zygote.ENV_VAR}=spawn for vLLM's own" if self.start_mode == "zygote" else ""
        return f"vllm {vllm_version()} (offline LLM{start})"

    @property
    def llm(self) -> Any:
        """The running ``vllm.LLM`` (for tests that drive vLLM-specific features)."""
        if self._llm is None:
            raise EngineFailure(f"cell {self.cell.id}: the engine is not running")
        return self._llm

    def sampling_params(self, spec: SamplingSpec, prompt_logprobs: int | None = None) -> Any:
        from vllm import SamplingParams

        kwargs = spec.to_kwargs()
        kwargs["logprobs"] = spec.logprobs
        if prompt_logprobs is not None:
            kwargs["prompt_logprobs"] = prompt_logprobs
        return SamplingParams(**kwargs)

    def reset_prefix_cache(self) -> None:
        if not self.llm.reset_prefix_cache():
            raise EngineFailure(f"cell {self.cell.id}: vLLM refused to reset the prefix cache")

    def collective_rpc(self, method: Any, kwargs: dict[str, Any] | None = None) -> list[Any]:
        """Run ``method`` (a worker method name, or a callable taking the worker) in every worker.

        Callables need VLLM_ALLOW_INSECURE_SERIALIZATION=1, which the adapter sets for the engine's life.
        A failure in the worker is an :class:`EngineFailure` naming the call and its first line.
        """
        what = method if isinstance(method, str) else getattr(method, "__name__", "callable")
        return list(
            self._utility(f"collective_rpc({what})", lambda: self.llm.collective_rpc(method, kwargs=kwargs or {}))
        )

    def _utility(self, what: str, call: Callable[[], Any]) -> Any:
        """``call()`` (a utility call into the engine); its failure is an :class:`EngineFailure` naming ``what``."""
        mark = log_size(self.log_path)
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - the worker's error is a finding about the engine
            self.dead = self._engine_is_dead(exc)
            raise EngineFailure(
                f"cell {self.cell.id}: {what} failed in the engine: {type(exc).__name__}: {summary(exc)}",
                self.log_tail(),
                read_since(self.log_path, mark),
            ) from None

    def reload_weights_from_path(self, checkpoint_dir: Path) -> None:
        """Reload every weight from the safetensors checkpoint in ``checkpoint_dir`` (worker.reload_weights)."""
        self.collective_rpc("reload_weights", {"weights_path": str(checkpoint_dir)})

    # -- the weight-transfer API's control plane (vLLM's VLLMWeightSyncClient shape) ----------------------
    def _weight_transfer(self, method: str, request: dict[str, Any] | None = None) -> None:
        call = getattr(self.llm, method, None)
        if call is None:
            raise EngineFailure(f"cell {self.cell.id}: vllm {vllm_version()}'s LLM has no {method}")
        self._utility(f"LLM.{method}", call if request is None else lambda: call(request))

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self._weight_transfer("init_weight_transfer_engine", {"init_info": init_info})

    def start_weight_update(self) -> None:
        self._weight_transfer("start_weight_update")

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self._weight_transfer("update_weights", {"update_info": update_info})

    def finish_weight_update(self) -> None:
        self._weight_transfer("finish_weight_update")

    def scheduler_budget(self) -> int | None:
        """Prompt tokens one engine step takes (``max_num_batched_tokens``)."""
        config = self.llm.llm_engine.vllm_config
        return int(config.scheduler_config.max_num_batched_tokens)

    def block_size(self) -> int:
        """KV-cache block size of the running engine (prefix caching reuses whole blocks only)."""
        return int(self.llm.llm_engine.vllm_config.cache_config.block_size)

    def token_context(self, request: Request) -> TokenContext:
        tokenizer = self.llm.get_tokenizer()
        stop = set(request.spec.stop_token_ids)
        if tokenizer.eos_token_id is not None:
            stop.add(int(tokenizer.eos_token_id))
        bad: tuple[tuple[int, ...], ...] = ()
        if request.spec.bad_words:
            params = self.sampling_params(request.spec)
            params.update_from_tokenizer(tokenizer)
            bad = tuple(tuple(w) for w in params.bad_words_token_ids or ())
        return TokenContext(tuple(request.prompt_ids), frozenset(stop), bad)

    def generate(self, requests: Sequence[Request]) -> list[list[Sample]]:
        if self.dead:
            raise EngineFailure(f"cell {self.cell.id}: the engine died earlier in this session")
        prompts = [{"prompt_token_ids": list(r.prompt_ids)} for r in requests]
        try:
            params = [self.sampling_params(r.spec, r.prompt_logprobs) for r in requests]
        except Exception as exc:  # noqa: BLE001 - vLLM's own validation of the parameters
            raise EngineFailure(
                f"cell {self.cell.id}: vLLM rejected the sampling parameters: {type(exc).__name__}: {exc}"
            ) from None
        mark = log_size(self.log_path)
        try:
            outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        except Exception as exc:  # noqa: BLE001 - any engine exception is a finding about the engine
            self.dead = self._engine_is_dead(exc)
            first = summary(exc)
            tail = self.log_tail()
            cause = root_cause(tail)
            raise EngineFailure(
                f"cell {self.cell.id}: engine failed during generate: {type(exc).__name__}: {first}"
                + (f" (root cause: {cause})" if cause else ""),
                tail,
                read_since(self.log_path, mark),
            ) from None
        return [self._samples(req, out) for req, out in zip(requests, outputs, strict=True)]

    @staticmethod
    def _engine_is_dead(exc: Exception) -> bool:
        name = type(exc).__name__
        return name in ("EngineDeadError", "EngineGenerateError") or "dead" in str(exc).lower()

    @staticmethod
    def _samples(request: Request, output: Any) -> list[Sample]:
        samples = []
        for completion in output.outputs:
            tokens = list(completion.token_ids)
            per_position = list(completion.logprobs or [])
            sampled: list[float | None] = []
            tops: list[dict[int, float]] = []
            for i, token in enumerate(tokens):
                entry = per_position[i] if i < len(per_position) else None
                values = {int(t): float(lp.logprob) for t, lp in (entry or {}).items()}
                tops.append(values)
                sampled.append(values.get(token))
            sample = Sample(tuple(request.prompt_ids), tokens, sampled, tops, completion.finish_reason)
            sample.cached_tokens = getattr(output, "num_cached_tokens", None)
            if request.prompt_logprobs is not None:
                sample.prompt_values = [
                    None if entry is None else {int(t): float(lp.logprob) for t, lp in entry.items()}
                    for entry in (output.prompt_logprobs or [])
                ]
            samples.append(sample)
        return samples
