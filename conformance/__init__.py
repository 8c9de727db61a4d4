"""logprob-parity: a conformance kit proving an inference engine returns the logprobs an RL trainer
thinks it returns.

Public API for custom tests (the suite under :mod:`conformance.suite` is built from the same pieces):

* :mod:`conformance.contract`: what a logprob means (:class:`SamplingSpec`, :func:`processed_distribution`,
  trainer semantics, :func:`objective_mismatch`).
* :func:`check_parity` / :func:`assert_parity`: judge engine samples against the contract over the fp32
  reference and explain the verdict (layer, worst tokens, metrics).
* :func:`compute_metrics`: the RL metrics of Δ = trainer − engine.
* :class:`HFReference`, :class:`ParityRunner`, :class:`EngineHandle`: drive an engine and the reference.
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
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'conformance' has no attribute {name!r}")
