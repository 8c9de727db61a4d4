"""logprob-parity: a conformance kit proving an inference engine returns the logprobs an RL trainer
thinks it returns.

Public API for custom tests (the suite under :mod:`conformance.suite` is built from the same pieces):

* :mod:`conformance.spec` (torch-free): :class:`SamplingSpec`, :class:`TokenContext`;
  :mod:`conformance.contract`: what a logprob means (:func:`processed_distribution`, trainer semantics,
  :func:`objective_mismatch`).
* :func:`check_parity` / :func:`assert_parity`: judge engine samples against the contract over the fp32
  reference and explain the verdict (layer, worst tokens, metrics).
* :func:`compute_metrics`: the RL metrics of Δ = trainer − engine.
* Diagnosis of a failure: :data:`VARIANTS` (step-order variants of the contract's steps a failure can be
  explained by), :func:`ablate` (which sampling parameters it needs), :func:`diagnose` /
  :class:`DiagnosisSettings` (what the ``parity`` fixture runs on a failing check) and :func:`write_repro`
  (the self-contained upstream reproduction script).
* :class:`ParitySession`, :class:`ParityRunner`, :class:`EngineHandle`, :class:`HFReference`: drive an
  engine and the reference; :func:`judge_samples`: the one judge pipeline every verdict goes through.
* :class:`Parity`: the ``parity`` fixture's object (``parity.check(strategy)``, ``parity.judge(...)``).
* :func:`assert_logprob_parity`: one call for a custom test: engine (or samples) vs a reference or your
  trainer's logits function (:class:`Reference`, :class:`TrainerFnReference`), with the kit's verdict.
* Engines: the :class:`Engine` protocol (:class:`Request`, :class:`Sample`, :class:`EngineFailure`), the
  built-in :class:`VllmOfflineEngine` and :class:`VllmServerEngine`, and the registry
  (:func:`register_engine`, :func:`engine_factory`).
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the same names, imported eagerly for type checkers only
    from conformance.ablation import ablate
    from conformance.api import assert_logprob_parity
    from conformance.contract import VARIANTS, objective_mismatch, processed_distribution
    from conformance.diagnosis import DiagnosisSettings, diagnose
    from conformance.engines.base import Engine, EngineFailure, Request, Sample
    from conformance.engines.handle import EngineHandle
    from conformance.engines.registry import engine_factory, register_engine
    from conformance.engines.vllm_offline import VllmOfflineEngine
    from conformance.engines.vllm_server import VllmServerEngine
    from conformance.judge import judge_samples
    from conformance.matrix import Cell, load_matrix
    from conformance.metrics import ParityMetrics, compute_metrics
    from conformance.parity import ParityReport, SequenceInput, check_parity
    from conformance.plugin.fixture import Parity, assert_parity, check_cases
    from conformance.reference import HFReference
    from conformance.repro import write_repro
    from conformance.runner import ParityRunner
    from conformance.session import ParitySession, PromptSet
    from conformance.spec import SamplingSpec, TokenContext
    from conformance.tolerances import Tolerance
    from conformance.trainer import Reference, TrainerFnReference

__version__ = "0.1.0"

# Lazy exports: the pytest plugin imports this package in every session of a repo that installs the
# kit, so importing it must not import torch/transformers until something is actually used.
_EXPORTS = {
    "assert_parity": "conformance.plugin.fixture",
    "check_cases": "conformance.plugin.fixture",
    "Parity": "conformance.plugin.fixture",
    "SamplingSpec": "conformance.spec",
    "TokenContext": "conformance.spec",
    "objective_mismatch": "conformance.contract",
    "processed_distribution": "conformance.contract",
    "VARIANTS": "conformance.contract",
    "ablate": "conformance.ablation",
    "diagnose": "conformance.diagnosis",
    "DiagnosisSettings": "conformance.diagnosis",
    "write_repro": "conformance.repro",
    "ParityMetrics": "conformance.metrics",
    "compute_metrics": "conformance.metrics",
    "ParityReport": "conformance.parity",
    "SequenceInput": "conformance.parity",
    "check_parity": "conformance.parity",
    "HFReference": "conformance.reference",
    "ParityRunner": "conformance.runner",
    "ParitySession": "conformance.session",
    "PromptSet": "conformance.session",
    "EngineHandle": "conformance.engines.handle",
    "register_engine": "conformance.engines.registry",
    "engine_factory": "conformance.engines.registry",
    "judge_samples": "conformance.judge",
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

__all__ = [  # the names of _EXPORTS, spelled out for linters (tests/test_vendoring.py keeps the two equal)
    "VARIANTS",
    "Cell",
    "DiagnosisSettings",
    "Engine",
    "EngineFailure",
    "EngineHandle",
    "HFReference",
    "Parity",
    "ParityMetrics",
    "ParityReport",
    "ParityRunner",
    "ParitySession",
    "PromptSet",
    "Reference",
    "Request",
    "Sample",
    "SamplingSpec",
    "SequenceInput",
    "TokenContext",
    "Tolerance",
    "TrainerFnReference",
    "VllmOfflineEngine",
    "VllmServerEngine",
    "ablate",
    "assert_logprob_parity",
    "assert_parity",
    "check_cases",
    "check_parity",
    "compute_metrics",
    "diagnose",
    "engine_factory",
    "judge_samples",
    "load_matrix",
    "objective_mismatch",
    "processed_distribution",
    "register_engine",
    "write_repro",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'conformance' has no attribute {name!r}")
