"""logprob-parity: a conformance kit proving an inference engine returns the logprobs an RL trainer
thinks it returns.

Public API for custom tests (the suite under :mod:`conformance.suite` is built from the same pieces):

* :mod:`conformance.contract`: what a logprob means (:class:`SamplingSpec`, :func:`processed_distribution`,
  trainer semantics, :func:`objective_mismatch`).
* :func:`check_parity` / :func:`assert_parity`: judge engine samples against the contract over the fp32
  reference and explain the verdict (layer, worst tokens, metrics).
* :func:`compute_metrics`: the RL metrics of Δ = trainer − engine.
* :class:`HFReference`, :class:`ParityRunner`, :class:`EngineHandle`: drive an engine and the reference.
* :func:`assert_logprob_parity`: one call for a custom test: engine (or samples) vs a reference or your
  trainer's logits function (:class:`Reference`, :class:`TrainerFnReference`), with the kit's verdict.
* Engines: the :class:`Engine` protocol (:class:`Request`, :class:`Sample`, :class:`EngineFailure`) and
  the built-in :class:`VllmOfflineEngine` and :class:`VllmServerEngine`; :func:`default_engine_factory`.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# Lazy exports: the pytest plugin imports this package in every session of a repo that installs the
# kit, so importing it must not import torch/transformers until something is actually used.
_EXPORTS = {
    "assert_parity": "conformance.checks",
    "check_cases": "conformance.checks",
    "SamplingSpec": "conformance.contract",
    "TokenContext": "conformance.contract",
    "objective_mismatch": "conformance.contract",
    "processed_distribution": "conformance.contract",
    "ParityMetrics": "conformance.metrics",
    "compute_metrics": "conformance.metrics",
    "ParityReport": "conformance.parity",
    "SequenceInput": "conformance.parity",
    "check_parity": "conformance.parity",
    "HFReference": "conformance.reference",
    "ParityRunner": "conformance.runner",
    "EngineHandle": "conformance.runner",
    "default_engine_factory": "conformance.runner",
    "assert_logprob_parity": "conformance.api",
    "Reference": "conformance.trainer",
    "TrainerFnReference": "conformance.trainer",
    "Engine": "conformance.engines.base",
    "EngineFailure": "conformance.engines.base",
    "Request": "conformance.engines.base",
    "Sample": "conformance.engines.base",
    "Cell": "conformance.matrix",
    "load_matrix": "conformance.matrix",
    "Tolerance": "conformance.tolerances",
    "VllmOfflineEngine": "conformance.engines.vllm_offline",
    "VllmServerEngine": "conformance.engines.vllm_server",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'conformance' has no attribute {name!r}")
