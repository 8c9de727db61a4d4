"""Diagnosis through the plugin, end to end, without vLLM: an in-process engine with a known semantic bug.

``tests/reference_engine.py`` samples the fp32 model through the contract; with ``REFERENCE_ENGINE_VARIANT``
in its cell's env it samples and reports under a step-order variant instead ("top_p before min_p" here).
A test project using the ``parity`` fixture (``parity.check`` and ``parity.judge`` + ``parity.assert_passed``)
runs against it with ``--parity-results`` and ``--parity-repro-dir``; the failures must be semantic, name
the variant, carry the ablation's minimal set {min_p, top_p}, write a kit-free reproduction script, put
``ablation`` and ``variant`` into the results records, and show them in the Markdown report. With
``--parity-diagnose off`` nothing of that happens. (vLLM engines: tests/test_selftest_diagnosis.py.)
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CONFTEST = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from conformance.engines.registry import register_engine
register_engine("reference-engine", "tests.reference_engine:factory")
"""
MATRIX = """
[[cell]]
id = "ref-variant"
engine = "reference-engine"
dtype = "float32"
logprobs_mode = "processed_logprobs"
env = { REFERENCE_ENGINE_VARIANT = "top_p before min_p" }
"""
TESTS = """
from hypothesis import strategies as st

from conformance.engines.base import Request
from conformance.spec import SamplingSpec
from conformance.strategies import Case

SPEC = SamplingSpec(temperature=0.9, top_p=0.5, min_p=0.3, frequency_penalty=0.2, max_tokens=8, seed=1, logprobs=2)


def test_check(parity):
    parity.check(st.just(Case((0, 3), SPEC)))


def test_judge(parity):
    requests = [Request(parity.prompts.ids[i], SPEC) for i in (0, 3)]
    parity.assert_passed(parity.judge(requests, parity.generate(requests)))


def test_clean_spec(parity):
    spec = SamplingSpec(temperature=0.9, top_p=0.5, max_tokens=6, seed=2)  # no min_p: the variant is inactive
    parity.check(st.just(Case((0, 3), spec)))
"""


def _run(pytester: pytest.Pytester, *extra: str) -> tuple[pytest.RunResult, Path]:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_project=TESTS)
    matrix = pytester.path / "m.toml"
    matrix.write_text(MATRIX)
    results = pytester.path / "results.jsonl"
    result = pytester.runpytest_subprocess(
        "-p",
        "conformance.plugin",
        "-p",
        "no:cacheprovider",
        "test_project.py",
        "--parity-matrix",
        str(matrix),
        "--parity-device",
        "cpu",
        "--parity-results",
        str(results),
        *extra,
    )
    return result, results


def test_failures_name_variant_parameters_and_reproduction(pytester: pytest.Pytester) -> None:
    repros = pytester.path / "repros"
    result, results = _run(pytester, "--parity-repro-dir", str(repros))
    result.assert_outcomes(failed=2, passed=1)
    out = result.stdout.str()
    assert out.count("FAILED [layer: semantic]") >= 2, out
    assert "step-order variant 'top_p before min_p'" in out
    assert "fails only while min_p=0.3 and top_p=0.5 are both set; passes with either removed" in out, out
    scripts = sorted(repros.glob("repro-ref-variant-*.py"))
    assert len(scripts) == 2, scripts  # one per failing test
    for script in scripts:
        assert f"python {script}" in out
        tree = ast.parse(script.read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert imported <= {"math", "os", "torch", "vllm", "transformers"}, imported
    records = [json.loads(line) for line in results.read_text().splitlines()]
    checks = [r for r in records if r.get("kind") == "check"]
    diagnosed = [r for r in checks if r.get("ablation")]
    assert len(diagnosed) == 2
    for record in diagnosed:
        assert record["variant"] == "top_p before min_p"
        assert record["ablation"]["minimal"] == ["min_p", "top_p"]
        assert record["ablation"]["one_at_a_time"] == {
            "temperature": "failed",
            "min_p": "passed",
            "top_p": "passed",
            "frequency_penalty": "failed",
        }
        assert record["repro"] and Path(record["repro"]).is_file()
    # re-runs of the ablation are not recorded as checks: 2 failing tests x (run + final replay) for the
    # property, one judge for the plain test, two passing clean checks (the clean property runs once)
    assert len(checks) == 2 + 1 + 1, [(r["test"], r["passed"]) for r in checks]
    report_dir = pytester.path / "report"
    done = subprocess.run(
        [sys.executable, "-m", "conformance", "report", str(results), "--out", str(report_dir)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    markdown = (report_dir / "report.md").read_text()
    assert "step-order variant the values match: `top_p before min_p`" in markdown
    assert markdown.count("minimal failing parameters: min_p, top_p") == 2, markdown
    assert "upstream reproduction: `python " in markdown


def test_diagnose_off(pytester: pytest.Pytester) -> None:
    result, results = _run(pytester, "--parity-diagnose", "off")
    result.assert_outcomes(failed=2, passed=1)
    out = result.stdout.str()
    assert "cause (ablation" not in out and "upstream reproduction" not in out
    assert "step-order variant 'top_p before min_p'" in out  # the variant search is part of the verdict
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert not any(r.get("ablation") for r in records)
