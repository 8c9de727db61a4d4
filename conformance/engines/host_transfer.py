"""``parity-host``: a host-memory backend for vLLM's weight-transfer API, so the API runs without CUDA.

vLLM's weight-transfer API (``init_weight_transfer_engine`` / ``start_weight_update`` / ``update_weights`` /
``finish_weight_update``, on ``vllm.LLM`` and as the server's RL routes) hands the bytes to a backend; the
built-in ones (NCCL, CUDA IPC) need CUDA. This backend moves them through files instead: the trainer side
(:func:`send_weights`) writes each chunk of named tensors as a safetensors file into a directory both
processes see and sends its path in ``update_info``; the worker side (:class:`HostWeightTransferEngine`)
loads the file and applies it exactly as vLLM's IPC backend applies what it receives: a layerwise reload
initialised at ``start_weight_update``, ``model.load_weights`` per chunk, finalised at
``finish_weight_update``. Only the transport is the kit's; the API, the worker's update session and the
layerwise reload under test are vLLM's.

The worker side is registered with vLLM's ``WeightTransferEngineFactory`` by the kit's
``vllm.general_plugins`` entry point (:mod:`conformance.engines.vllm_plugin`); a cell selects it with
``engine_kwargs = { weight_transfer_config = { backend = "parity-host" } }``. This module imports vLLM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from conformance.engines.vllm_plugin import HOST_BACKEND

__all__ = ["HOST_BACKEND", "HostWeightTransferEngine", "WeightSyncClient", "send_weights"]


@dataclass
class HostInitInfo(WeightTransferInitInfo):  # type: ignore[misc]  # vLLM is read as Any (pyproject: follow_imports)
    """No rendezvous: the chunk files name themselves."""


@dataclass
class HostUpdateInfo(WeightTransferUpdateInfo):  # type: ignore[misc]  # vLLM is read as Any (pyproject: follow_imports)
    """One chunk: the safetensors file holding it and the tensor names, in load order."""

    path: str
    names: list[str]


class HostWeightTransferEngine(WeightTransferEngine[HostInitInfo, HostUpdateInfo]):  # type: ignore[misc]  # vLLM is read as Any (pyproject: follow_imports)
    """Worker side: chunks arrive as safetensors files; applied like vLLM's IPC backend applies its tensors."""

    init_info_cls = HostInitInfo
    update_info_cls = HostUpdateInfo

    def init_transfer_engine(self, init_info: HostInitInfo) -> None:
        """Nothing to set up: each chunk's file is named in its update_info."""

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def receive_weights(self, update_info: HostUpdateInfo) -> None:
        tensors = load_file(update_info.path, device=str(self.device))
        missing = [n for n in update_info.names if n not in tensors]
        if missing:
            raise ValueError(f"{update_info.path} lacks the tensors {missing[:5]} named in update_info")
        self.model.load_weights([(name, tensors[name]) for name in update_info.names])

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def shutdown(self) -> None:
        """No resources held between updates."""


class WeightSyncClient(Protocol):
    """vLLM's ``VLLMWeightSyncClient`` shape: the control plane of the weight-transfer API. The kit's offline
    and server engine adapters implement it (``vllm.LLM``'s methods; the server's RL routes)."""

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None: ...

    def start_weight_update(self) -> None: ...

    def update_weights(self, update_info: dict[str, Any]) -> None: ...

    def finish_weight_update(self) -> None: ...


def send_weights(
    client: WeightSyncClient, named_tensors: Sequence[tuple[str, torch.Tensor]], directory: Path, chunks: int = 2
) -> None:
    """The trainer side of one update: init, start, ``chunks`` update_weights calls, finish.

    The tensors are split into ``chunks`` consecutive groups (so a layer's tensors can straddle two calls, as
    they do with the bucketed sends RL frameworks use) and each group is written to ``directory`` first.
    """
    directory.mkdir(parents=True, exist_ok=True)
    size = max(1, -(-len(named_tensors) // max(1, chunks)))
    groups = [named_tensors[i : i + size] for i in range(0, len(named_tensors), size)]
    client.init_weight_transfer_engine({})
    client.start_weight_update()
    for index, group in enumerate(groups):
        path = directory / f"chunk-{index}.safetensors"
        save_file({name: tensor.detach().contiguous().cpu() for name, tensor in group}, str(path))
        client.update_weights({"path": str(path.resolve()), "names": [name for name, _ in group]})
    client.finish_weight_update()
