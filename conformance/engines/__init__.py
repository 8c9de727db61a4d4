"""Engine adapters: the :class:`Engine` protocol and the built-in vLLM implementation."""

from conformance.engines.base import Engine, EngineFailure, Request, Sample

__all__ = ["Engine", "EngineFailure", "Request", "Sample"]
