"""Markdown summary of parity results, fit for a CI job summary (``$GITHUB_STEP_SUMMARY``).

Sections, most urgent first: failures (cell, test, params, layer, reasons, the step-order variant the
values match, the ablation's minimal failing parameters and the reproduction script, worst token), a per-cell
table of the latest run (failing cells first), the golden drift table when the run verified goldens,
the worst tokens overall, a comparison across runs when several are given, and the plots.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from conformance.report.cells import COLUMNS, cell_rows, series_of, table
from conformance.report.results import Run, finite


def _g(value: Any, digits: int = 3) -> str:
    if not isinstance(value, (int, float)) or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}g}"


def _versions(run: Run) -> str:
    v = run.versions
    return (
        ", ".join(f"{k} {v[k]}" for k in ("vllm", "torch", "transformers", "kit", "device") if k in v)
        or "versions not recorded"
    )


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _failures(run: Run, limit: int = 20) -> list[str]:
    lines: list[str] = []
    failed, seen = [], set()
    # hypothesis replays a failing example once more: report each distinct failure once, and by the record
    # of its diagnosed replay (ablation, reproduction) rather than the undiagnosed first run of it
    diagnosed = {
        (r.get("cell"), r.get("test"), str(r.get("params")))
        for r in run.checks
        if not r.get("passed", True) and (r.get("ablation") or r.get("repro"))
    }
    for r in run.checks:
        key = (r.get("cell"), r.get("test"), str(r.get("params")), tuple(r.get("reasons") or ()))
        if key[:3] in diagnosed and not (r.get("ablation") or r.get("repro")):
            continue
        if not r.get("passed", True) and not r.get("known") and key not in seen:
            seen.add(key)
            failed.append(r)
    for record in failed[:limit]:
        lines.append(
            f"- **{record.get('cell')}** `{record.get('test')}` [layer: {record.get('layer')}] "
            f"params `{record.get('params')}`"
        )
        for reason in (record.get("reasons") or [])[:3]:
            lines.append(f"  - {reason}")
        if record.get("variant"):
            lines.append(f"  - step-order variant the values match: `{record['variant']}`")
        ablation = record.get("ablation")
        if isinstance(ablation, dict):
            minimal = (
                ", ".join(ablation.get("minimal") or []) or "none (fails with every sampling parameter at its default)"
            )
            lines.append(f"  - minimal failing parameters: {minimal}; {ablation.get('summary', '')}")
            table = ablation.get("one_at_a_time") or {}
            if table:
                lines.append("  - one at a time: " + ", ".join(f"{k} reset: {v}" for k, v in table.items()))
        if record.get("repro"):
            lines.append(f"  - upstream reproduction: `python {record['repro']}`")
        worst = (record.get("worst") or [None])[0]
        if worst:
            lines.append(
                f"  - worst token: seq {worst.get('sequence')} pos {worst.get('position')} token {worst.get('token')}: "
                f"engine {_g(worst.get('engine'), 6)} vs expected {_g(worst.get('expected'), 6)} (|Δ| {_g(worst.get('excess'))})"
            )
    if len(failed) > limit:
        lines.append(f"- ... and {len(failed) - limit} more failed checks")
    covered: dict[str, int] = defaultdict(int)
    for r in run.checks:
        if not r.get("passed", True) and r.get("known"):
            covered[str(r["known"])] += 1
    for text, count in sorted(covered.items()):
        lines.append(f"- {count} check(s) covered by a {text}")
    for failure in run.failures:
        tag = f"known finding {failure['known']}" if failure.get("known") else "engine failure"
        lines.append(f"- **{failure.get('cell')}** {tag}: {failure.get('reason')} (params: {failure.get('params')})")
    return lines


def _golden_rows(run: Run) -> list[list[str]]:
    grouped: dict[tuple[str, str], dict[str, dict[str, Any]]] = defaultdict(dict)
    for record in run.checks:
        golden = record.get("golden")
        if isinstance(golden, dict):
            grouped[(str(record.get("cell")), str(golden.get("case")))][series_of(record)] = record
    rows = []
    current = run.versions.get("vllm", "?")
    for (cell, case), pair in sorted(grouped.items()):
        g, ref = pair.get("vs golden", {}), pair.get("replay vs reference", {})
        info = (g or ref).get("golden", {})
        gm, rm = g.get("metrics", {}), ref.get("metrics", {})
        agree = info.get("token_agreement")
        bound = info.get("min_token_agreement")
        rows.append(
            [
                cell,
                case,
                str(info.get("recorded_versions", {}).get("vllm", "?")),
                current,
                (_g(agree) + (f" (≥ {bound:g})" if isinstance(bound, (int, float)) else ""))
                if agree is not None
                else "-",
                _g(gm.get("max_abs")),
                _g(gm.get("mean_abs")),
                _g(gm.get("mean_signed"), 2),
                _g(rm.get("max_abs")),
                str(info.get("verdict", "-")).upper(),
            ]
        )
    return sorted(rows, key=lambda r: (r[-1] != "FAIL", r[0], r[1]))


def _worst_tokens(run: Run, limit: int = 10) -> list[list[str]]:
    rows = []
    for record in run.checks:
        for w in record.get("worst") or []:
            excess = w.get("excess")
            if isinstance(excess, (int, float)) and excess > 0:
                rows.append((excess, record, w))
    rows.sort(key=lambda t: -t[0])
    return [
        [
            str(rec.get("cell")),
            series_of(rec),
            f"`{rec.get('test')}`",
            f"{w.get('sequence')}/{w.get('position')}/{w.get('token')}",
            w.get("kind", "-"),
            _g(w.get("engine"), 6),
            _g(w.get("expected"), 6),
            _g(excess),
        ]
        for excess, rec, w in rows[:limit]
    ]


def _trend_rows(runs: list[Run]) -> list[list[str]]:
    rows = []
    for run in runs:
        deltas = [abs(d) for r in run.checks for d in finite((r.get("tokens") or {}).get("delta", []))]
        rows.append(
            [
                run.path.name,
                run.versions.get("vllm", "?"),
                str(len(run.checks)),
                str(sum(not r.get("passed", True) for r in run.checks)),
                str(len(run.failures)),
                _g(max(deltas)) if deltas else "-",
                _g(sum(deltas) / len(deltas)) if deltas else "-",
            ]
        )
    return rows


def markdown_report(runs: list[Run], plots: list[Path], out: Path) -> str:
    """The report of ``runs`` (the last one is summarised in detail); plot links are relative to ``out``."""
    latest = runs[-1]
    failed = sum(not r.get("passed", True) and not r.get("known") for r in latest.checks)
    known = sum(not r.get("passed", True) and bool(r.get("known")) for r in latest.checks)
    status = "FAILED" if failed or any(not f.get("known") for f in latest.failures) else "passed"
    lines = [
        f"# logprob parity report: {status}",
        "",
        (
            f"Run `{latest.path.name}`: {len(latest.checks)} checks, {failed} failed, {known} covered by known findings, "
            f"{len(latest.failures)} engine failures; {_versions(latest)}."
        ),
        "Δ = expected − engine in nats (for golden checks: new build's replay − golden value).",
        "",
    ]
    fail_lines = _failures(latest)
    if fail_lines:
        lines += ["## Failures", "", *fail_lines, ""]
    lines += ["## Per cell", ""]
    rows = cell_rows(latest.checks, latest.failures, by_series=True)
    rows.sort(key=lambda r: (-r["failed"], r["cell"], r["comparison"]))  # failing cells first
    lines += table(rows, ("cell", "comparison", *COLUMNS[1:])).splitlines()
    golden = _golden_rows(latest)
    if golden:
        lines += ["", "## Golden drift (teacher-forced replay)", ""]
        lines += _table(
            [
                "cell",
                "case",
                "recorded vllm",
                "verified vllm",
                "greedy/regen token agreement",
                "max abs Δ vs golden",
                "mean abs Δ vs golden",
                "mean Δ vs golden",
                "max abs Δ vs fp32 ref",
                "verdict",
            ],
            golden,
        )
    worst = _worst_tokens(latest)
    if worst:
        lines += ["", "## Worst tokens (distance from the legitimate range)", ""]
        lines += _table(["cell", "comparison", "test", "seq/pos/token", "kind", "engine", "expected", "abs Δ"], worst)
    if len(runs) > 1:
        lines += ["", "## Across runs", ""]
        lines += _table(
            ["file", "vllm", "checks", "failed", "engine fails", "max abs Δ", "mean abs Δ"], _trend_rows(runs)
        )
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{p.stem}]({p.relative_to(out).as_posix() if p.is_relative_to(out) else p})" for p in plots]
    return "\n".join(lines) + "\n"
