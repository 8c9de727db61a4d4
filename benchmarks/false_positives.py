"""False positives of the parity suite (the kit's one false-positive driver): run ``pytest -m parity`` on
clean engines ``--runs`` times, each a fresh process with another ``--hypothesis-seed``, and each repeating
every parity test ``--repeat`` times in-session (``--parity-repeat``: fresh hypothesis data per
repetition, one engine start per cell), and count what failed. A clean engine must give 0 failed tests
(known engine findings are xfails, not failures); tolerances are whatever the matrix says (never loosened).

    .venv/bin/python benchmarks/false_positives.py --runs 20 --profile ci --json docs/false-positives-suite.json
    .venv/bin/python benchmarks/false_positives.py --runs 1 --repeat 20 -- --parity-cells fp32-processed
    .venv/bin/python benchmarks/false_positives.py --runs 1 --profile dev -- --parity-matrix conformance/fixtures/matrices/gpu.toml

Every run writes a junit XML (test outcomes) and the ``--parity-results`` JSONL (per-check verdicts) into
``--work``; arguments after ``--`` go to every pytest run. Prints a table per run (seed, wall time, tests
passed / failed / skipped / xfailed, checks and failed checks, engine failures) and the failing tests with
their first message line; exits 1 if any test failed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class RunResult:
    """Outcome of one suite run."""

    run: int
    seed: int
    seconds: float
    exit_code: int
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    xfailed: int = 0
    checks: int = 0
    failed_checks: int = 0
    engine_failures: int = 0
    known_engine_failures: int = 0
    failures: list[str] = field(default_factory=list)


def parse_junit(path: Path, result: RunResult) -> None:
    """Count test outcomes from a junit XML; a failure or error is named with its first message line."""
    if not path.is_file():
        result.failures.append(f"no junit XML written (pytest exit code {result.exit_code})")
        return
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skipped = case.find("skipped")
        if bad is not None:
            result.failed += 1
            first = (bad.get("message") or bad.text or "").strip().splitlines()
            result.failures.append(f"{name}: {first[0][:200] if first else ''}")
        elif skipped is not None:
            if (skipped.get("type") or "") == "pytest.xfail":
                result.xfailed += 1
            else:
                result.skipped += 1
        else:
            result.passed += 1


def parse_results(path: Path, result: RunResult) -> None:
    """Count per-check verdicts and engine failures from a ``--parity-results`` JSONL file."""
    if not path.is_file():
        return
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if record.get("kind") == "check":
            result.checks += 1
            result.failed_checks += not record.get("passed", True)
        elif record.get("kind") == "engine-failure":
            result.engine_failures += 1
            result.known_engine_failures += record.get("known") is not None


def run_once(run: int, seed: int, profile: str, repeat: int, work: Path, extra: list[str]) -> RunResult:
    junit, results = work / f"run{run:03d}.xml", work / f"run{run:03d}.jsonl"
    for path in (junit, results):
        path.unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "parity",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--parity-profile={profile}",
        f"--hypothesis-seed={seed}",
        f"--junitxml={junit}",
        f"--parity-results={results}",
        f"--parity-repeat={repeat}",
        *extra,
    ]
    start = time.perf_counter()
    with (work / f"run{run:03d}.log").open("w") as log:
        code = subprocess.call(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    result = RunResult(run, seed, time.perf_counter() - start, code)
    parse_junit(junit, result)
    parse_results(results, result)
    return result


def table(results: list[RunResult]) -> str:
    lines = [
        (
            "| run | hypothesis seed | wall s | passed | failed | skipped | xfailed | checks | failed checks | "
            "engine failures (known) |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.run} | {r.seed} | {r.seconds:.0f} | {r.passed} | {r.failed} | {r.skipped} | {r.xfailed} | "
            f"{r.checks} | {r.failed_checks} | {r.engine_failures} ({r.known_engine_failures}) |"
        )
    total_failed = sum(r.failed for r in results)
    lines.append(
        f"\nfalse positives: {total_failed} failed tests and {sum(r.failed_checks for r in results)} failed "
        f"checks over {len(results)} runs, {sum(r.checks for r in results)} checks"
    )
    return "\n".join(lines)


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--first-seed", type=int, default=1, help="run i uses hypothesis seed first-seed + i")
    parser.add_argument("--profile", default="ci", help="--parity-profile of every run (dev, ci, nightly)")
    parser.add_argument("--repeat", type=int, default=1, help="--parity-repeat of every run (in-session repetitions)")
    parser.add_argument("--work", type=Path, default=Path(".parity-cache/false-positives"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    args.work.mkdir(parents=True, exist_ok=True)
    results = []
    for run in range(args.runs):
        result = run_once(run, args.first_seed + run, args.profile, args.repeat, args.work, extra)
        results.append(result)
        print(
            f"run {run + 1}/{args.runs} (seed {result.seed}): {result.failed} failed, {result.passed} passed, "
            f"{result.checks} checks in {result.seconds:.0f} s",
            flush=True,
        )
    print(table(results))
    for r in results:
        for failure in r.failures:
            print(f"run {r.run} (seed {r.seed}): {failure}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {"profile": args.profile, "repeat": args.repeat, "extra": extra, "runs": [asdict(r) for r in results]},
                indent=1,
            )
        )
    sys.exit(1 if any(r.failed or r.exit_code not in (0, 1) for r in results) else 0)


if __name__ == "__main__":
    main()
