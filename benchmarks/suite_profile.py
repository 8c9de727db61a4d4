"""Where the parity suite's time goes: run ``pytest -m parity`` (or a subset) and print, per cell and in
total, engine starts, generation, the reference forward, the contract comparison, the rest of each test
(hypothesis, strategies, pytest) and the time outside tests (collection, fixtures, idle), plus checked
tokens per second.

    .venv/bin/python benchmarks/suite_profile.py                                  # the CPU main job
    .venv/bin/python benchmarks/suite_profile.py --json docs/profile-cpu.json -- --parity-cells fp32-processed
    .venv/bin/python benchmarks/suite_profile.py --from results.jsonl --junit junit.xml --wall 480   # a run made elsewhere

Arguments after ``--`` go to pytest. The split comes from the ``timing`` records the ``parity`` fixture
writes to ``--parity-results`` (per test: wall, engine_start, generate, reference, contract) and the
per-test durations of a junit XML; tests that do not use the ``parity`` fixture (execution-mode pairs,
precision) appear as their own row with their total duration only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("engine_start", "generate", "reference", "contract")


def junit_durations(path: Path) -> dict[str, float]:
    """node id (as pytest prints it) -> duration (setup + call + teardown) from a junit XML."""
    out: dict[str, float] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        module = (case.get("classname") or "").replace(".", "/") + ".py"
        out[f"{module}::{case.get('name')}"] = float(case.get("time") or 0.0)
    return out


def profile(records: list[dict[str, Any]], durations: dict[str, float], wall: float, workers: int) -> dict[str, Any]:
    """Per-cell and total time split (seconds) from results records and junit durations."""
    cells: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    timed: set[str] = set()
    for record in records:
        if record.get("kind") == "timing":
            row = cells[str(record["cell"])]
            seconds = record["seconds"]
            row["tests"] += 1
            row["wall"] += seconds.get("wall", 0.0)
            for part in PARTS:
                row[part] += seconds.get(part, 0.0)
            timed.add(str(record["test"]))
        elif record.get("kind") == "check":
            row = cells[str(record["cell"])]
            row["checks"] += 1
            row["tokens"] += int((record.get("metrics") or {}).get("n", 0) or 0)
    untimed = {t: d for t, d in durations.items() if t not in timed}
    if untimed:
        row = cells["(tests without the parity fixture)"]
        row["tests"] += len(untimed)
        row["wall"] += sum(untimed.values())
    for row in cells.values():
        row["rest of test"] = max(0.0, row["wall"] - sum(row[p] for p in PARTS)) if row["tests"] else 0.0
        row["tokens/s"] = row["tokens"] / row["wall"] if row["wall"] else 0.0
    total: dict[str, float] = defaultdict(float)
    for row in cells.values():
        for key, value in row.items():
            total[key] += value
    total["tokens/s"] = total["tokens"] / total["wall"] if total["wall"] else 0.0
    test_time = sum(durations.values()) if durations else total["wall"]
    engine = total["engine_start"] + total["generate"]
    return {
        "cells": {k: dict(v) for k, v in sorted(cells.items())},
        "total": dict(total),
        "session_wall": wall,
        "workers": workers,
        "outside_tests": max(0.0, wall * workers - test_time),
        "kit_overhead_vs_engine": (total["reference"] + total["contract"]) / engine if engine else None,
    }


def table(result: dict[str, Any]) -> str:
    cols = ("tests", "wall", *PARTS, "rest of test", "checks", "tokens", "tokens/s")
    lines = ["| cell | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    rows = list(result["cells"].items()) + [("**total**", result["total"])]
    for name, row in rows:
        values = [
            f"{row.get(c, 0):.0f}" if c in ("tests", "checks", "tokens") else f"{row.get(c, 0):.1f}" for c in cols
        ]
        lines.append(f"| {name} | " + " | ".join(values) + " |")
    overhead = result["kit_overhead_vs_engine"]
    lines.append("")
    lines.append(
        f"session wall {result['session_wall']:.0f} s with {result['workers']} worker(s); time outside tests "
        f"(collection, session fixtures, idle workers) {result['outside_tests']:.0f} worker-s; kit overhead "
        f"(reference + contract) = {overhead * 100:.1f}% of engine time (start + generation)"
        if overhead is not None
        else f"session wall {result['session_wall']:.0f} s"
    )
    return "\n".join(lines)


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(".parity-cache/profile"))
    parser.add_argument("--from", dest="source", type=Path, default=None, help="results JSONL of a run made elsewhere")
    parser.add_argument("--junit", type=Path, default=None, help="its junit XML (with --from)")
    parser.add_argument("--wall", type=float, default=0.0, help="its session wall time in seconds (with --from)")
    parser.add_argument("--workers", type=int, default=1, help="its pytest-xdist workers (with --from)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.source is None:
        args.work.mkdir(parents=True, exist_ok=True)
        results, junit = args.work / "results.jsonl", args.work / "junit.xml"
        results.unlink(missing_ok=True)
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "parity",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--parity-results={results}",
            f"--junitxml={junit}",
            *extra,
        ]
        workers = int(next((a.split("=", 1)[1] for a in extra if a.startswith("--numprocesses=")), 0) or 0)
        if "-n" in extra:
            workers = int(extra[extra.index("-n") + 1])
        start = time.perf_counter()
        code = subprocess.call(command, cwd=ROOT)
        wall = time.perf_counter() - start
        print(f"pytest exit code {code}, {wall:.0f} s")
    else:
        results, junit, wall, workers = args.source, args.junit, args.wall, args.workers
    records = (
        [json.loads(line) for line in results.read_text().splitlines() if line.strip()] if results.is_file() else []
    )
    durations = junit_durations(junit) if junit is not None and junit.is_file() else {}
    result = profile(records, durations, wall, max(workers, 1))
    print(table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
