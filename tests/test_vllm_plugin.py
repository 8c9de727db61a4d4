"""The kit's vLLM plugin: its entry point is installed, it registers the host weight-transfer backend, and
registering twice (vLLM may load plugins in several places of one process) is harmless."""

from __future__ import annotations

import pytest

from conformance.engines.vllm_plugin import HOST_BACKEND, installed, register


def test_entry_point_is_installed() -> None:
    assert installed(), "the 'vllm.general_plugins' entry point is missing: reinstall the kit (pip install -e .)"


def test_register_adds_the_host_backend_once() -> None:
    factory = pytest.importorskip("vllm.distributed.weight_transfer.factory").WeightTransferEngineFactory
    register()
    register()
    assert HOST_BACKEND in factory._registry
    engine_cls = factory._registry[HOST_BACKEND]()
    assert engine_cls.__name__ == "HostWeightTransferEngine"
    assert engine_cls.update_info_cls(path="/x.safetensors", names=["a"]).names == ["a"]
