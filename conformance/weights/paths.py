"""How weights reach a running engine, and the sequence the kit recommends to RL users.

* :data:`UPDATE_PATHS`: every way the kit knows to push weights into vLLM, each with the reason it cannot
  run with an engine and version (:func:`path_unavailable`, the skip reason) and its push function. Which
  engine capabilities a path needs is an ``isinstance`` check against the protocols of
  :mod:`conformance.engines.base` (:class:`WorkerRPC`, :class:`CheckpointReload`, :class:`WeightTransferClient`).
* :func:`recommended_update`: **the sequence the kit documents for RL users**: push the weights, then
  ``reset_prefix_cache()`` before the next request. vLLM never resets the prefix cache by itself, so a
  prompt cached under W0 is otherwise served with W0's KV after the update.
* :class:`ProbeSet` and the default probes: the greedy requests judged before and after an update.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from conformance.engines.base import (
    CheckpointReload,
    Engine,
    EngineFailure,
    PrefixCacheReset,
    Request,
    WeightTransferClient,
    WorkerRPC,
)
from conformance.engines.vllm_common import vllm_version
from conformance.engines.vllm_plugin import HOST_BACKEND
from conformance.spec import SamplingSpec
from conformance.weights.state import WeightSet


def _vllm_version() -> str:
    return vllm_version() or "not installed"


def _rpc(engine: Engine, what: str) -> WorkerRPC:
    if not isinstance(engine, WorkerRPC):
        raise EngineFailure(f"{type(engine).__name__} has no collective_rpc: cannot push weights via {what}")
    return engine


def _push_reload_iterator(engine: Engine, weights: WeightSet, workdir: Path) -> None:
    items = weights.items()

    def reload_weights_iterator(worker: Any) -> None:
        worker.reload_weights(weights_iterator=iter(items))

    _rpc(engine, "reload_weights").collective_rpc(reload_weights_iterator)


def _push_reload_path(engine: Engine, weights: WeightSet, workdir: Path) -> None:
    if not isinstance(engine, CheckpointReload):
        raise EngineFailure(f"{type(engine).__name__} has no reload_weights_from_path")
    engine.reload_weights_from_path(weights.save(workdir / weights.label.replace(" ", "_")))


def _push_load_weights(engine: Engine, weights: WeightSet, workdir: Path) -> None:
    items = weights.items()

    def model_load_weights(worker: Any) -> None:
        worker.model_runner.model.load_weights(items)

    _rpc(engine, "model.load_weights").collective_rpc(model_load_weights)


def _worker_lacks(attribute: str) -> str | None:
    try:
        from vllm.v1.worker.gpu_worker import Worker
    except Exception as exc:  # noqa: BLE001 - any import problem means the path is unavailable
        return f"vllm {_vllm_version()}: cannot import the V1 worker ({type(exc).__name__})"
    if not hasattr(Worker, attribute):
        return f"vllm {_vllm_version()}: the V1 worker has no {attribute}"
    return None


def _weight_transfer_unavailable(backend: str) -> Callable[[Engine], str | None]:
    def reason(engine: Engine) -> str | None:
        try:
            from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory  # noqa: F401
        except ImportError:
            return f"vllm {_vllm_version()} has no weight-transfer API (vllm.distributed.weight_transfer)"
        if not isinstance(engine, WeightTransferClient):
            return f"{type(engine).__name__} does not drive the weight-transfer API (no init_weight_transfer_engine)"
        cell = getattr(engine, "cell", None)
        if backend == HOST_BACKEND:
            from conformance.engines.vllm_plugin import installed

            if not installed():
                return (
                    f"the kit's vLLM plugin (entry point group 'vllm.general_plugins') is not installed, so vLLM "
                    f"cannot find the {HOST_BACKEND!r} backend: pip install the kit"
                )
        elif not torch.cuda.is_available():
            return f"weight-transfer backend {backend!r} needs CUDA (torch.cuda.is_available() is False)"
        elif backend != "ipc":
            return (
                f"weight-transfer backend {backend!r} needs a trainer process group beside the engine; the kit "
                f"drives only 'ipc' (same GPU, same host) and {HOST_BACKEND!r}"
            )
        elif not hasattr(engine, "llm"):
            return f"{type(engine).__name__}: CUDA IPC handles are sent to an offline vllm.LLM only"
        configured = ((getattr(cell, "extra_engine_kwargs", None) or {}).get("weight_transfer_config") or {}).get(
            "backend"
        )
        if configured != backend:
            return (
                f"cell {getattr(cell, 'id', '?')} does not start vLLM with weight_transfer_config backend {backend!r} "
                f'(engine_kwargs = {{ weight_transfer_config = {{ backend = "{backend}" }} }})'
            )
        return None

    return reason


def _push_weight_transfer_host(engine: Engine, weights: WeightSet, workdir: Path) -> None:
    """init_weight_transfer_engine / start_weight_update / update_weights (two chunks) / finish_weight_update
    with the kit's host-memory backend: the engine adapter is the control-plane client (offline: ``vllm.LLM``'s
    methods; server: its RL routes)."""
    from conformance.engines.host_transfer import send_weights

    if not isinstance(engine, WeightTransferClient):
        raise EngineFailure(f"{type(engine).__name__} does not drive the weight-transfer API")
    send_weights(engine, weights.items(), workdir / "transfer")


def _push_weight_transfer_ipc(engine: Engine, weights: WeightSet, workdir: Path) -> None:
    """init_weight_transfer_engine / start_weight_update / update_weights / finish_weight_update over CUDA IPC
    (the trainer's tensors stay on its GPU; vLLM's own trainer-side helper makes the handles)."""
    from dataclasses import asdict

    from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferEngine

    llm = engine.llm  # type: ignore[attr-defined]
    tensors = [(n, t.to("cuda")) for n, t in weights.items()]
    try:
        llm.init_weight_transfer_engine({"init_info": {}})
        llm.start_weight_update()
        IPCWeightTransferEngine.trainer_send_weights(
            iter(tensors), {"send_mode": lambda info: llm.update_weights({"update_info": asdict(info)})}
        )
        llm.finish_weight_update()
    except Exception as exc:  # noqa: BLE001 - a failure of the engine's update path is a finding
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise EngineFailure(f"weight transfer over ipc failed: {type(exc).__name__}: {first[:300]}") from None
    finally:
        del tensors
        torch.cuda.synchronize()


@dataclass(frozen=True)
class UpdatePath:
    """One way to push weights into a running engine."""

    name: str
    description: str
    push: Callable[[Engine, WeightSet, Path], None]
    unavailable: Callable[[Engine], str | None]
    """Why the path cannot run with this engine and vLLM version (None: it can)."""


def _needs(
    capability: type, method: str, worker_method: str | None = "reload_weights"
) -> Callable[[Engine], str | None]:
    """The path needs the engine ``capability`` (and, in vLLM's worker, ``worker_method``)."""

    def reason(engine: Engine) -> str | None:
        if not isinstance(engine, capability):
            return f"{type(engine).__name__} has no {method}"
        return _worker_lacks(worker_method) if worker_method else None

    return reason


UPDATE_PATHS: dict[str, UpdatePath] = {
    p.name: p
    for p in (
        UpdatePath(
            "reload-iterator",
            "collective_rpc -> worker.reload_weights(weights_iterator=...) (tensors sent to the engine process)",
            _push_reload_iterator,
            _needs(WorkerRPC, "collective_rpc"),
        ),
        UpdatePath(
            "reload-path",
            "worker.reload_weights(weights_path=DIR) from a safetensors checkpoint the trainer wrote "
            "(offline: collective_rpc; server: POST /collective_rpc in VLLM_SERVER_DEV_MODE)",
            _push_reload_path,
            _needs(CheckpointReload, "reload_weights_from_path"),
        ),
        UpdatePath(
            "load-weights",
            "collective_rpc -> worker.model_runner.model.load_weights(weights) (what many RL frameworks call)",
            _push_load_weights,
            _needs(WorkerRPC, "collective_rpc", worker_method=None),
        ),
        UpdatePath(
            "weight-transfer-host",
            "init_weight_transfer_engine / start_weight_update / update_weights / finish_weight_update, the kit's "
            "host-memory backend (runs without CUDA; the API, update session and layerwise reload are vLLM's)",
            _push_weight_transfer_host,
            _weight_transfer_unavailable(HOST_BACKEND),
        ),
        UpdatePath(
            "weight-transfer-ipc",
            "init_weight_transfer_engine / start_weight_update / update_weights / finish_weight_update, CUDA IPC",
            _push_weight_transfer_ipc,
            _weight_transfer_unavailable("ipc"),
        ),
        UpdatePath(
            "weight-transfer-nccl",
            "init_weight_transfer_engine / start_weight_update / update_weights / finish_weight_update, NCCL",
            lambda engine, weights, workdir: None,
            _weight_transfer_unavailable("nccl"),
        ),
    )
}


def path_unavailable(path: UpdatePath, engine: Engine) -> str | None:
    """Why ``path`` cannot run on ``engine`` (the skip reason), or None."""
    return path.unavailable(engine)


def default_path(engine: Engine) -> UpdatePath:
    """The first update path this engine supports (reload from tensors, else from a checkpoint directory)."""
    for name in ("reload-iterator", "reload-path"):
        if path_unavailable(UPDATE_PATHS[name], engine) is None:
            return UPDATE_PATHS[name]
    raise EngineFailure(
        f"{type(engine).__name__}: no weight-update path is available (needs collective_rpc or reload_weights_from_path)"
    )


def recommended_update(engine: Engine, path: UpdatePath, weights: WeightSet, workdir: Path | None = None) -> None:
    """The update sequence the kit documents for RL users.

    1. Make sure no request is in flight (an offline ``LLM.generate`` call has returned; a server has
       answered every request sent before the update).
    2. Push the full weight set through ``path``.
    3. ``reset_prefix_cache()``: vLLM does not drop KV computed under the old weights by itself.
    """
    with tempfile.TemporaryDirectory(prefix="parity-weights-") as tmp:
        path.push(engine, weights, workdir or Path(tmp))
    if isinstance(engine, PrefixCacheReset):
        engine.reset_prefix_cache()


@dataclass(frozen=True)
class ProbeSet:
    """Requests that probe an update: the same requests before (to fill the prefix cache) and after."""

    requests: tuple[Request, ...]

    @classmethod
    def default(cls, prompts: Sequence[Sequence[int]], long_prompt: Sequence[int], max_tokens: int = 16) -> ProbeSet:
        """Greedy decoding of a long prompt (several KV blocks, so a cache hit is real) and short prompts."""
        spec = SamplingSpec(temperature=0.0, max_tokens=max_tokens, logprobs=1)
        return cls(tuple(Request(tuple(p), spec) for p in [long_prompt, *prompts]))


def training_batch(prompts: Sequence[Sequence[int]], count: int = 4) -> list[tuple[int, ...]]:
    """The trainer stand-in's batch: the first ``count`` prompts (token ids)."""
    return [tuple(p) for p in prompts[:count]]


def long_prompt(prompts: Sequence[Sequence[int]], length: int = 320) -> tuple[int, ...]:
    """A prompt of ``length`` tokens (prompts 8, 9, 10 joined, BOS kept once): several KV blocks on any tier."""
    first, *rest = [tuple(prompts[i]) for i in (8, 9, 10)]
    joined = first + tuple(t for p in rest for t in p[1:])
    if len(joined) < length:
        raise ValueError(f"prompts 8-10 give {len(joined)} tokens, fewer than the {length} a long probe needs")
    return joined[:length]


def default_probes(prompts: Sequence[Sequence[int]]) -> ProbeSet:
    """The tier's probe set over a prompt set's ids: the long prompt plus prompts 0 and 12, greedy."""
    return ProbeSet.default([prompts[0], prompts[12]], long_prompt(prompts))


def head_dtype(engine: Engine) -> str:
    """The dtype the engine computes the lm_head projection in, read in the worker.

    vLLM keeps the lm_head weight in the model dtype and applies ``head_dtype`` in its logits processor
    (activations and weight cast for the projection), so that attribute is what is read; a model without
    one reports its lm_head weight's dtype.
    """

    def read_head_dtype(worker: Any) -> str:
        model = worker.model_runner.model
        dtype = getattr(getattr(model, "logits_processor", None), "head_dtype", None)
        return str(dtype if dtype is not None else model.lm_head.weight.dtype)

    return str(_rpc(engine, "lm_head dtype").collective_rpc(read_head_dtype)[0]).replace("torch.", "")
