"""The kit's vLLM plugin (``vllm.general_plugins`` entry point): registers the ``parity-host`` weight-transfer
backend (:mod:`conformance.engines.host_transfer`) in every vLLM process, the engine's workers included.

Registration is lazy (a module path, imported only when a cell starts vLLM with
``weight_transfer_config = { backend = "parity-host" }``), idempotent, and a no-op on a vLLM without the
weight-transfer API, so the plugin never changes or breaks an engine that does not ask for the backend.
"""

from __future__ import annotations

import contextlib

HOST_BACKEND = "parity-host"
"""The name cells put in ``weight_transfer_config.backend``."""

ENTRY_POINT_GROUP = "vllm.general_plugins"


def register() -> None:
    """Entry point: add ``parity-host`` to vLLM's weight-transfer engine registry."""
    try:
        from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
    except ImportError:  # a vLLM without the weight-transfer API
        return
    with contextlib.suppress(ValueError):  # already registered in this process
        WeightTransferEngineFactory.register_engine(
            HOST_BACKEND, "conformance.engines.host_transfer", "HostWeightTransferEngine"
        )


def installed() -> bool:
    """Whether vLLM will find this plugin: the kit is installed with its entry points (``pip install``),
    not just importable from a path."""
    from importlib.metadata import entry_points

    return any(ep.value == f"{__name__}:register" for ep in entry_points(group=ENTRY_POINT_GROUP))
