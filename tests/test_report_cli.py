"""``python -m conformance report``: Markdown summary (failures first), plots, trend, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conformance.__main__ import main


def _check(
    cell: str, passed: bool, deltas: list[float], golden: dict[str, Any] | None = None, vllm: str = "0.32.0"
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "kind": "check",
        "test": f"test_x[{cell}]",
        "cell": cell,
        "params": {"temperature": 0.7},
        "passed": passed,
        "layer": None if passed else "semantic",
        "reasons": [] if passed else ["max |Δ| 0.5 > 0.0001"],
        "metrics": {
            "max_abs": max(abs(d) for d in deltas),
            "mean_abs": sum(abs(d) for d in deltas) / len(deltas),
            "mean_signed": 0.0,
        },
        "boundary_tokens": 0,
        "worst": [
            {
                "sequence": 0,
                "position": 3,
                "token": 42,
                "kind": "sampled",
                "engine": -1.0,
                "expected": -1.5,
                "excess": 0.5,
            }
        ],
        "tokens": {"pos": list(range(len(deltas))), "delta": deltas, "p": [0.5] * len(deltas)},
        "versions": {"vllm": vllm, "torch": "2.13.0+cpu", "device": "cpu"},
    }
    if golden is not None:
        record["golden"] = golden
    return record


def _write(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_report_lists_failures_first_and_writes_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    golden = {
        "case": "greedy",
        "compared": "replay-vs-golden",
        "token_agreement": 1.0,
        "min_token_agreement": 1.0,
        "recorded_versions": {"vllm": "0.31.0"},
        "verdict": "pass",
    }
    a = _write(tmp_path / "old.jsonl", [_check("fp32-processed", True, [1e-6, -2e-6, 3e-6], vllm="0.31.0")])
    b = _write(
        tmp_path / "new.jsonl",
        [
            _check("fp32-processed", True, [1e-6, -2e-6, 3e-6], golden=golden),
            _check("bf16-processed", False, [0.5, -0.1, 0.02]),
        ],
    )
    out = tmp_path / "report"
    assert main(["report", str(a), str(b), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert text.startswith("# logprob parity report: FAILED")
    assert text.index("## Failures") < text.index("## Per cell")
    assert "bf16-processed" in text.split("## Failures")[1].split("##")[0]
    assert "## Golden drift" in text and "| fp32-processed | greedy | 0.31.0 | 0.32.0 |" in text
    assert "## Across runs" in text
    for name in ("delta_hist.png", "abs_delta_vs_prob.png", "error_by_position.png", "trend.png"):
        assert (out / name).stat().st_size > 10_000, name
        assert f"]({name})" in text
    assert main(["report", str(b), "--out", str(out), "--no-plots", "--fail-on-failure"]) == 1


def test_bad_results_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "check"}\nnot json\n')
    assert main(["report", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad.jsonl:2" in err and "not valid JSON" in err
    assert main(["report", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "results file not found" in capsys.readouterr().err
