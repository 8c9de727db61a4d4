"""The one per-cell aggregation: check records -> one row per cell (and comparison), for the terminal
summary printed at the end of a run and for the Markdown report of ``python -m conformance report``.

Both read the same records (what ``--parity-results`` writes, one per check: :meth:`ParityReport.as_record`
plus the test and golden keys), so the two tables cannot drift apart.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

COLUMNS = (
    "cell",
    "checks",
    "failed",
    "known",
    "layers",
    "tokens",
    "max|Δ|",
    "tol used",
    "mean|Δ|",
    "meanΔ",
    "k3",
    "boundary",
    "NeMo mult",
    "TRL>cap",
    "χ² seq",
    "IS ESS",
    "engine fails",
)
"""max|Δ|, mean|Δ|, meanΔ and k3 are over the point values of the sampled tokens (what a trainer sees);
"tol used" is the verdict's margin: the largest distance of any returned value (sampled or top-n) from its
legitimate range, as a fraction of the check's ``max_abs`` (scaled by 1/T below T = 1); above 1 fails.
"failed" counts failed checks no known finding explains, "known" those a known divergence finding covers.
The RL frameworks' own diagnostics over the same tokens (:mod:`conformance.rl_metrics`), worst check of the
cell: "NeMo mult" NeMo-RL's token_mult_prob_error (max; its gate is 1.05), "TRL>cap" the fraction of TRL's
importance ratios beyond its cap (max), "χ² seq" verl's sequence-level chi² (max), "IS ESS" verl's
effective sample size of the IS weights (min)."""

Record = Mapping[str, Any]


def series_of(record: Record) -> str:
    """Which comparison a check record is: ``parity`` (engine vs reference), or a golden comparison."""
    golden = record.get("golden")
    if isinstance(golden, dict):
        return "vs golden" if golden.get("compared") == "replay-vs-golden" else "replay vs reference"
    return "parity"


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


def _tokens(record: Record) -> int:
    metrics = record.get("metrics") or {}
    if isinstance(metrics.get("n"), int):
        return int(metrics["n"])
    return len((record.get("tokens") or {}).get("delta", []))


def _used(record: Record) -> float:
    """Largest excess of one check over its (temperature-scaled) max_abs bound."""
    worst = record.get("worst") or []
    excess = max((_number(w.get("excess")) for w in worst), default=0.0)
    bound = _number((record.get("tolerance") or {}).get("max_abs"))
    if math.isnan(bound):
        return math.nan
    return excess / bound if bound > 0 else math.inf


def cell_rows(
    checks: Iterable[Record], failures: Iterable[Record] = (), by_series: bool = False
) -> list[dict[str, Any]]:
    """One dict per cell (per cell and comparison with ``by_series``), keyed by :data:`COLUMNS` (plus
    ``comparison``): token-weighted means, worst maxima, counts. Sorted by cell."""
    grouped: dict[tuple[str, str], list[Record]] = defaultdict(list)
    for record in checks:
        grouped[(str(record.get("cell")), series_of(record) if by_series else "parity")].append(record)
    fails: dict[str, int] = defaultdict(int)
    for failure in failures:
        fails[str(failure.get("cell"))] += 1
    for cell in fails:
        if not any(key[0] == cell for key in grouped):
            grouped[(cell, "parity")] = []
    rows = []
    for (cell, series), records in sorted(grouped.items()):
        weights = [_tokens(r) for r in records]
        total = sum(weights)

        def weighted(
            name: str, records: list[Record] = records, weights: list[int] = weights, total: int = total
        ) -> float:
            if not total:
                return math.nan
            values = [_number((r.get("metrics") or {}).get(name)) * w for r, w in zip(records, weights) if w]
            return sum(values) / total

        maxima = [_number((r.get("metrics") or {}).get("max_abs")) for r, w in zip(records, weights) if w]
        rl = [r["rl"] for r in records if isinstance(r.get("rl"), dict)]

        def worst(key: str, pick: Any = max, rl: list[dict[str, Any]] = rl) -> float:
            values = [_number(x.get(key)) for x in rl if math.isfinite(_number(x.get(key)))]
            return float(pick(values)) if values else math.nan

        rows.append(
            {
                "cell": cell,
                "comparison": series,
                "checks": len(records),
                "failed": sum(not r.get("passed", True) and not r.get("known") for r in records),
                "known": sum(not r.get("passed", True) and bool(r.get("known")) for r in records),
                "layers": ",".join(sorted({str(r["layer"]) for r in records if r.get("layer")})) or "-",
                "tokens": total,
                "max|Δ|": max(maxima, default=math.nan),
                "tol used": max((_used(r) for r in records), default=math.nan),
                "mean|Δ|": weighted("mean_abs"),
                "meanΔ": weighted("mean_signed"),
                "k3": weighted("k3_kl"),
                "boundary": sum(int(r.get("boundary_tokens", 0) or 0) for r in records),
                "NeMo mult": worst("nemo_mult_prob_error"),
                "TRL>cap": worst("trl_frac_over_cap"),
                "χ² seq": worst("verl_chi2_seq"),
                "IS ESS": worst("verl_is_ess", min),
                "engine fails": fails.get(cell, 0) if series == "parity" else 0,
            }
        )
    return rows


def fmt(value: Any) -> str:
    """'-' for NaN, two significant digits below 1e-3, else four decimals; other values as text."""
    if not isinstance(value, float):
        return str(value)
    if math.isnan(value):
        return "-"
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.2g}"
    return f"{value:.4f}"


def table(rows: list[dict[str, Any]], columns: tuple[str, ...] = COLUMNS) -> str:
    """A padded Markdown table of ``rows`` (terminal and report alike)."""
    cells = [[fmt(row[c]) for c in columns] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(columns)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(columns, widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |" for r in cells]
    return "\n".join(lines)


def summary_table(recorder: Any) -> str:
    """The session's per-cell table followed by one line per engine failure."""
    lines = [table(cell_rows(recorder.records, recorder.failure_records))]
    for failure in recorder.engine_failures:
        tag = f"known engine finding {failure.known}" if failure.known else "engine failure"
        lines.append(f"{tag} in {failure.cell}: {failure.reason} (params: {failure.params})")
    return "\n".join(lines)
