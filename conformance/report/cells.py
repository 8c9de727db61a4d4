"""Human-readable summaries of a parity session: the per-cell table printed at the end of a run."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

COLUMNS = (
    "cell", "checks", "failed", "layers", "tokens", "max|Δ|", "tol used", "mean|Δ|", "meanΔ", "k3", "boundary",
    "engine fails",
)
"""max|Δ|, mean|Δ|, meanΔ and k3 are over the point values of the sampled tokens (what a trainer sees);
"tol used" is the verdict's margin: the largest distance of any returned value (sampled or top-n) from its
legitimate range, as a fraction of the check's ``max_abs`` (scaled by 1/T below T = 1); above 1 fails."""


def _fmt(value: float) -> str:
    """'-' for NaN, two significant digits below 1e-3, else four decimals."""
    if math.isnan(value):
        return "-"
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.2g}"
    return f"{value:.4f}"


def _used(report: Any) -> float:
    """Largest excess of one check over its (temperature-scaled) max_abs bound."""
    excess = max((row.excess for row in report.rows), default=0.0)
    return excess / report.tolerance.max_abs if report.tolerance.max_abs > 0 else math.inf


def cell_rows(recorder: Any) -> list[dict[str, Any]]:
    """One dict per cell aggregating its checks (token-weighted means, worst max)."""
    by_cell: dict[str, list[Any]] = defaultdict(list)
    for _test, cell, report in recorder.reports:
        by_cell[cell].append(report)
    fails: dict[str, int] = defaultdict(int)
    for failure in recorder.engine_failures:
        fails[failure.cell] += 1
    rows = []
    for cell in sorted(set(by_cell) | set(fails)):
        reports = by_cell.get(cell, [])
        n = sum(r.metrics.n for r in reports)
        weighted = lambda attr: (  # noqa: E731
            sum(getattr(r.metrics, attr) * r.metrics.n for r in reports if r.metrics.n) / n if n else math.nan
        )
        layers = sorted({r.layer for r in reports if r.layer})
        rows.append(
            {
                "cell": cell,
                "checks": len(reports),
                "failed": sum(not r.passed for r in reports),
                "layers": ",".join(layers) or "-",
                "tokens": n,
                "max|Δ|": max((r.metrics.max_abs for r in reports if r.metrics.n), default=math.nan),
                "tol used": max((_used(r) for r in reports), default=math.nan),
                "mean|Δ|": weighted("mean_abs"),
                "meanΔ": weighted("mean_signed"),
                "k3": weighted("k3_kl"),
                "boundary": sum(r.boundary_tokens for r in reports),
                "engine fails": fails.get(cell, 0),
            }
        )
    return rows


def summary_table(recorder: Any) -> str:
    """The per-cell table (Markdown-compatible) followed by one line per engine failure."""
    rows = cell_rows(recorder)
    cells = [[_fmt(row[c]) if isinstance(row[c], float) else str(row[c]) for c in COLUMNS] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(COLUMNS)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(COLUMNS, widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |" for r in cells]
    for failure in recorder.engine_failures:
        tag = f"known engine finding {failure.known}" if failure.known else "engine failure"
        lines.append(f"{tag} in {failure.cell}: {failure.reason} (params: {failure.params})")
    return "\n".join(lines)
