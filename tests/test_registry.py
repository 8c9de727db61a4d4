"""Engines are found by name in the registry: a new engine is one module plus one registry line.

``tests/reference_engine.py`` (the contract applied to the fp32 model, in-process) is registered from a
conftest through the public :func:`conformance.engines.registry.register_engine` and named by a matrix
cell; the suite's own tests run against it through the plugin, and tests needing a capability it lacks
skip with the reason. No if/else in the kit knows about it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conformance.engines.registry import UnknownEngine, engine_factory, engine_names, register_engine, unregister_engine

ROOT = Path(__file__).resolve().parents[1]


def test_builtins_and_registration() -> None:
    assert {"vllm", "vllm-server"} <= set(engine_names())
    register_engine("reference-engine", "tests.reference_engine:factory")
    try:
        from tests.reference_engine import factory

        assert engine_factory("reference-engine") is factory
        assert "reference-engine" in engine_names()
    finally:
        unregister_engine("reference-engine")
    with pytest.raises(UnknownEngine) as info:
        engine_factory("reference-engine")
    assert str(info.value).startswith("unknown engine 'reference-engine' (registered: ") and "\n" not in str(info.value)


def test_registered_engine_runs_the_suite(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from conformance.engines.registry import register_engine
register_engine("reference-engine", "tests.reference_engine:factory")
"""
    )
    matrix = pytester.path / "m.toml"
    matrix.write_text(
        '[[cell]]\nid = "ref-fp32"\nengine = "reference-engine"\ndtype = "float32"\nlogprobs_mode = "processed_logprobs"\n'
    )
    result = pytester.runpytest_subprocess(
        "-p",
        "conformance.plugin",
        "--pyargs",
        "conformance.suite",
        "-m",
        "parity",
        "--parity-matrix",
        str(matrix),
        "-k",
        "test_logprobs_match_contract or test_prefix_cache_hit_matches_cold or test_seeded_requests",
        "--parity-examples",
        "4",
        "--parity-device",
        "cpu",
        "-p",
        "no:cacheprovider",
        "-rs",
    )
    out = result.stdout.str()
    result.assert_outcomes(passed=1, skipped=2)
    assert "cannot reset its prefix cache" in out and "does not expose its per-step token budget" in out, out
    assert "| ref-fp32" in out  # the per-cell summary lists the registered engine's cell
