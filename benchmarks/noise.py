"""Measure clean-engine noise per precision class, the data behind conformance/tolerances.py.

Per cell, the distribution over checks of the metrics the verdict uses: max |Δ| (sampled and top-n, the
distance from the legitimate range), mean |Δ|, |mean Δ| and its excess over the 4σ/√n allowance, in T >= 1
units (processed values carry logit noise divided by T), plus boundary tokens and the checks that failed.

Two sources:

* live: start each cell's engine and judge ``--checks`` cases from the suite's own hypothesis strategy
  (every metric recorded whatever the verdict);
* ``--from RESULTS.jsonl [...]``: the check records of suite runs (``--parity-results``), e.g. a GPU run
  made with ``scripts/gpu_ci.sh`` (parity checks of engines against the reference; golden comparisons and
  checks a known finding covers are left out).

    .venv/bin/python benchmarks/noise.py --checks 200 --cells fp32-processed,bf16-processed
    .venv/bin/python benchmarks/noise.py --matrix benchmarks/noise.toml --json results/noise.json
    .venv/bin/python benchmarks/noise.py --from results/gpu/gpu.jsonl --json docs/noise-gpu-h200.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
COLUMNS = [
    "cell",
    "checks",
    "tokens",
    "max_abs_p50",
    "max_abs_p99",
    "max_abs_max",
    "top_max_max",
    "mean_abs_max",
    "abs_mean_max",
    "bias_excess_max",
    "boundary_tokens",
    "false_positives",
    "start_s",
    "run_s",
]


def check_noise(record: dict[str, Any], raw_mode: bool, noise_floor: float) -> dict[str, float] | None:
    """One check's noise (T >= 1 units) from its record (:meth:`ParityReport.as_record`), None if empty."""
    from conformance.metrics import ParityMetrics, bias_excess

    residual = record.get("residual") or {}
    if not residual.get("n"):
        return None
    temperature = float((record.get("params") or {}).get("temperature", 1.0))
    t = 1.0 if raw_mode or temperature <= 0 else min(max(temperature, 0.01), 1.0)
    worst = record.get("worst") or []
    excess = [float(w["excess"]) for w in worst if math.isfinite(float(w.get("excess", 0.0)))]
    top = [float(w["excess"]) for w in worst if w.get("kind") == "top" and math.isfinite(float(w.get("excess", 0.0)))]
    metrics = ParityMetrics(**residual)
    return {
        "max_abs": max(excess, default=0.0) * t,
        "mean_abs": metrics.mean_abs * t,
        "bias_excess": bias_excess(metrics, 0.0, noise_floor=noise_floor / t) * t,
        "abs_mean": abs(metrics.mean_signed) * t,
        "top_max": max(top, default=0.0) * t,
        "boundary": float(record.get("boundary_tokens", 0)),
        "n": float(residual["n"]),
        "passed": float(bool(record.get("passed", True))),
    }


def summarise(cell: str, precision: str, per_check: list[dict[str, float]], **extra: Any) -> dict[str, Any]:
    arr = {k: np.array([c[k] for c in per_check]) for k in (per_check[0] if per_check else {})}

    def q(key: str, p: float) -> float:
        return float(np.quantile(arr[key], p)) if key in arr and arr[key].size else math.nan

    return {
        "cell": cell,
        "precision": precision,
        "checks": len(per_check),
        "tokens": int(arr["n"].sum()) if "n" in arr else 0,
        "max_abs_p50": q("max_abs", 0.5),
        "max_abs_p99": q("max_abs", 0.99),
        "max_abs_max": q("max_abs", 1.0),
        "top_max_max": q("top_max", 1.0),
        "mean_abs_max": q("mean_abs", 1.0),
        "abs_mean_max": q("abs_mean", 1.0),
        "bias_excess_max": q("bias_excess", 1.0),
        "boundary_tokens": int(arr["boundary"].sum()) if "boundary" in arr else 0,
        "false_positives": int((arr["passed"] == 0).sum()) if "passed" in arr else 0,
        "start_s": extra.pop("start_s", math.nan),
        "run_s": extra.pop("run_s", math.nan),
        **extra,
    }


def from_results(paths: list[Path], matrix: Path) -> list[dict[str, Any]]:
    """Per-cell noise from suite check records (parity checks only)."""
    from conformance.matrix import load_matrix
    from conformance.report.cells import series_of

    cells = {c.id: c for c in load_matrix(matrix)}
    per_cell: dict[str, list[dict[str, float]]] = defaultdict(list)
    for path in paths:
        for line in path.read_text().splitlines():
            record = json.loads(line) if line.strip() else {}
            if record.get("kind") != "check" or series_of(record) != "parity" or record.get("known"):
                continue
            cell = cells.get(str(record.get("cell")))
            if cell is None:  # e.g. a server cell's offline twin: judged under its own id, not a matrix cell
                continue
            noise = check_noise(record, cell.logprobs_mode.startswith("raw"), cell.tolerance.mean_abs)
            if noise is not None:
                per_cell[cell.id].append(noise)
    return [
        summarise(cell_id, cells[cell_id].precision, checks, tolerance=cells[cell_id].tolerance.__dict__)
        for cell_id, checks in sorted(per_cell.items())
    ]


def live(args: argparse.Namespace) -> list[dict[str, Any]]:
    from hypothesis import HealthCheck, Phase, given, settings

    from conformance.engines.base import EngineFailure
    from conformance.matrix import load_matrix, select_cells
    from conformance.session import ParitySession
    from conformance.strategies import cases

    cells = select_cells(load_matrix(args.matrix), [c for c in args.cells.split(",") if c], str(args.matrix))
    session = ParitySession(model=args.model)
    rows = []
    for cell in cells:
        runner = session.runner(cell)
        prompts, handle = runner.prompts, runner.handle
        vocab = session.vocab(session.model_path(cell))
        t0 = time.perf_counter()
        _ = handle.engine
        start_s = time.perf_counter() - t0
        per_check: list[dict[str, float]] = []
        failures: list[str] = []

        @settings(
            max_examples=args.checks,
            deadline=None,
            database=None,
            derandomize=False,
            suppress_health_check=list(HealthCheck),
            phases=[Phase.generate],
        )
        @given(case=cases(vocab, len(prompts.ids)))
        def measure(case: Any) -> None:
            try:
                requests = runner.requests(case)
                samples = runner.generate(requests)
            except EngineFailure as exc:
                failures.append(f"{exc.reason} ({case.spec.describe()})")
                return
            noise = check_noise(
                runner.judge(requests, samples).as_record(),
                cell.logprobs_mode.startswith("raw"),
                cell.tolerance.mean_abs,
            )
            if noise is not None:
                per_check.append(noise)

        random.seed(args.seed)
        t1 = time.perf_counter()
        measure()
        run_s = time.perf_counter() - t1
        handle.close()
        row = summarise(
            cell.id,
            cell.precision,
            per_check,
            start_s=round(start_s, 1),
            run_s=round(run_s, 1),
            engine_failures=failures,
            tolerance=cell.tolerance.__dict__,
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matrix", type=Path, default=HERE / "noise.toml")
    parser.add_argument("--cells", default="")
    parser.add_argument("--checks", type=int, default=100)
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--from",
        dest="sources",
        type=Path,
        nargs="+",
        default=None,
        help="results JSONL files of suite runs (their matrix: --matrix)",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = from_results(args.sources, args.matrix) if args.sources else live(args)
    print("\n| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in COLUMNS) + " |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
