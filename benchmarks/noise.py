"""Measure clean-engine noise per precision class, the data behind conformance/tolerances.py.

For each cell it starts the real engine, draws ``--checks`` cases from the suite's own hypothesis
strategy (seeded, so reruns draw the same cases), judges them (every metric is recorded
whatever the verdict) and prints, per cell, the distribution over checks of the metrics the
verdict uses: max |Δ| (sampled and top-n), mean |Δ|, |mean Δ| minus its 4σ/√n allowance, plus the
largest raw-logprob error seen over the top-20 tokens of raw cells (the basis of the precision band).

    .venv/bin/python benchmarks/noise.py --checks 200 --cells fp32-processed,bf16-processed
    .venv/bin/python benchmarks/noise.py --matrix benchmarks/noise.toml --json results/noise.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from hypothesis import HealthCheck, given, settings

    from conformance.engines.base import EngineFailure
    from conformance.matrix import load_matrix, select_cells
    from conformance.metrics import bias_excess
    from conformance.session import ParitySession
    from conformance.strategies import cases

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matrix", type=Path, default=HERE / "noise.toml")
    parser.add_argument("--cells", default="")
    parser.add_argument("--checks", type=int, default=100)
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

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

        @settings(max_examples=args.checks, deadline=None, database=None, derandomize=False,
                  suppress_health_check=list(HealthCheck), phases=["generate"])
        @given(case=cases(vocab, len(prompts.ids)))
        def measure(case) -> None:
            try:
                requests = runner.requests(case)
                samples = runner.generate(requests)
            except EngineFailure as exc:
                failures.append(f"{exc.reason} ({case.spec.describe()})")
                return
            report = runner.judge(requests, samples)
            m = report.residual  # what the verdict bounds: distance to the legitimate range
            if m.n == 0:
                return
            # Normalise to T >= 1 units: processed values carry logit noise divided by T.
            t = 1.0 if cell.logprobs_mode.startswith("raw") else min(case.spec.effective_temperature, 1.0)
            excess = [r.excess for r in report.rows if math.isfinite(r.excess)]
            top = [r.excess for r in report.rows if r.kind == "top" and math.isfinite(r.excess)]
            per_check.append(
                {
                    "max_abs": max(excess, default=0.0) * t,
                    "mean_abs": m.mean_abs * t,
                    "bias_excess": bias_excess(m, 0.0, noise_floor=cell.tolerance.mean_abs / t) * t,
                    "abs_mean": abs(m.mean_signed) * t,
                    "top_max": max(top, default=0.0) * t,
                    "boundary": report.boundary_tokens,
                    "n": m.n,
                    "passed": report.passed,
                }
            )

        random.seed(args.seed)
        t1 = time.perf_counter()
        measure()
        run_s = time.perf_counter() - t1
        handle.close()
        arr = {k: np.array([c[k] for c in per_check]) for k in (per_check[0] if per_check else {})}
        q = lambda k, p: float(np.quantile(arr[k], p)) if k in arr and arr[k].size else math.nan  # noqa: E731
        row = {
            "cell": cell.id,
            "precision": cell.precision,
            "checks": len(per_check),
            "tokens": int(arr["n"].sum()) if "n" in arr else 0,
            "start_s": round(start_s, 1),
            "run_s": round(run_s, 1),
            "max_abs_p50": q("max_abs", 0.5),
            "max_abs_p99": q("max_abs", 0.99),
            "max_abs_max": q("max_abs", 1.0),
            "top_max_max": q("top_max", 1.0),
            "mean_abs_max": q("mean_abs", 1.0),
            "abs_mean_max": q("abs_mean", 1.0),
            "bias_excess_max": q("bias_excess", 1.0),
            "boundary_tokens": int(arr["boundary"].sum()) if "boundary" in arr else 0,
            "false_positives": int((~arr["passed"].astype(bool)).sum()) if "passed" in arr else 0,
            "engine_failures": failures,
            "tolerance": cell.tolerance.__dict__,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    cols = ["cell", "checks", "tokens", "max_abs_p50", "max_abs_p99", "max_abs_max", "top_max_max",
            "mean_abs_max", "abs_mean_max", "bias_excess_max", "boundary_tokens", "false_positives", "start_s", "run_s"]
    print("\n| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in cols) + " |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
