"""PNG plots of parity results (matplotlib, Agg backend): readable without the accompanying text.

* :func:`delta_histograms`: Δ = expected − engine per cell (one panel per cell, one colour per comparison);
* :func:`abs_delta_vs_probability`: |Δ| against the token's probability (log-log), per cell;
* :func:`error_by_position`: mean and max |Δ| per generated position, per cell;
* :func:`trend`: max and mean |Δ| per cell across several runs (e.g. vLLM versions).

Each function takes :class:`~conformance.report.results.Run` objects and writes one PNG, returning its path.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from conformance.report.cells import series_of
from conformance.report.results import Run

FLOOR = 1e-9
"""|Δ| below this (exact agreement) is drawn at this value on log axes."""
SERIES_COLORS = {"parity": "#1f77b4", "vs golden": "#d62728", "replay vs reference": "#2ca02c"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "figure.dpi": 110})
    return plt


def _tokens(run: Run) -> dict[tuple[str, str], dict[str, list[float]]]:
    """(cell, series) -> concatenated per-token pos / delta / p."""
    out: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: {"pos": [], "delta": [], "p": []})
    for record in run.checks:
        tokens = record.get("tokens") or {}
        key = (str(record.get("cell")), series_of(record))
        pos, delta, p = tokens.get("pos", []), tokens.get("delta", []), tokens.get("p", [])
        for a, b, c in zip(pos, delta, p):
            if isinstance(b, (int, float)) and math.isfinite(b):
                out[key]["pos"].append(a)
                out[key]["delta"].append(b)
                out[key]["p"].append(c)
    return out


def _grid(plt: Any, count: int, cols: int = 3, width: float = 4.6, height: float = 3.0) -> tuple[Any, list[Any]]:
    cols = max(1, min(count, cols))
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows + 0.6), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]


def _title(fig: Any, text: str, run: Run) -> None:
    v = run.versions
    sub = ", ".join(f"{k} {v[k]}" for k in ("vllm", "torch", "device") if k in v)
    fig.suptitle(text + (f"\n{sub}" if sub else ""), fontsize=12)


def _panels(data: dict[tuple[str, str], dict[str, list[float]]]) -> list[tuple[str, str]]:
    """(cell, series) pairs with data, by cell then in :data:`SERIES_COLORS` order."""
    order = list(SERIES_COLORS)
    return sorted(data, key=lambda k: (k[0], order.index(k[1]) if k[1] in order else len(order)))


def delta_histograms(run: Run, out: Path) -> Path:
    """One panel per (cell, comparison): histogram of Δ (nats) on its own scale, with n and max |Δ|."""
    plt = _pyplot()
    data = _tokens(run)
    panels = _panels(data) or [("(no token data)", "parity")]
    fig, axes = _grid(plt, len(panels), cols=len({series for _, series in panels}))
    for ax, (cell, series) in zip(axes, panels):
        deltas = data.get((cell, series), {}).get("delta", [])
        if deltas:
            worst = max(abs(d) for d in deltas)
            span = max(worst, FLOOR) * 1.05
            ax.hist(deltas, bins=41, range=(-span, span), color=SERIES_COLORS.get(series, "gray"), alpha=0.8)
            mean = sum(deltas) / len(deltas)
            ax.text(
                0.02,
                0.97,
                f"n={len(deltas)}\nmax|Δ|={worst:.2g}\nmeanΔ={mean:+.2g}",
                transform=ax.transAxes,
                va="top",
                fontsize=8,
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"},
            )
        ax.set_title(f"{cell}: {series}")
        ax.set_xlabel("Δ = expected − engine (nats)")
        ax.set_ylabel("tokens (log)")
        ax.set_yscale("log")
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 2))
        ax.axvline(0, color="black", lw=0.6)
    _title(fig, "Δ per cell and comparison (sampled tokens; each panel on its own scale)", run)
    fig.tight_layout()
    path = out / "delta_hist.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def abs_delta_vs_probability(run: Run, out: Path) -> Path:
    """|Δ| against the expected token probability, log-log: one panel per comparison, a colour per cell."""
    plt = _pyplot()
    data = _tokens(run)
    series_list = [s for s in SERIES_COLORS if any(k[1] == s for k in data)] or ["parity"]
    fig, axes = plt.subplots(1, len(series_list), figsize=(6.2 * len(series_list), 5.0), squeeze=False)
    cmap = plt.get_cmap("tab10")
    cells = sorted({cell for cell, _ in data})
    for ax, series in zip(axes[0], series_list):
        for i, cell in enumerate(cells):
            tokens = data.get((cell, series))
            if not tokens:
                continue
            pairs = [
                (x, max(abs(d), FLOOR))
                for x, d in zip(tokens["p"], tokens["delta"])
                if isinstance(x, (int, float)) and x > 0
            ]
            if pairs:
                ax.scatter(
                    [x for x, _ in pairs],
                    [y for _, y in pairs],
                    s=10,
                    alpha=0.55,
                    color=cmap(i % 10),
                    label=f"{cell} (n={len(pairs)})",
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(series)
        ax.set_xlabel("token probability under the expected distribution")
        ax.set_ylabel(f"|Δ| (nats; exact agreement drawn at {FLOOR:g})")
        ax.grid(True, which="major", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best", markerscale=1.5)
    _title(fig, "|Δ| against token probability", run)
    fig.tight_layout()
    path = out / "abs_delta_vs_prob.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def error_by_position(run: Run, out: Path) -> Path:
    """Mean |Δ| (solid) and max |Δ| (dotted) per generated position: a panel per comparison, a colour per cell."""
    plt = _pyplot()
    data = _tokens(run)
    series_list = [s for s in SERIES_COLORS if any(k[1] == s for k in data)] or ["parity"]
    fig, axes = plt.subplots(1, len(series_list), figsize=(6.2 * len(series_list), 5.0), squeeze=False)
    cmap = plt.get_cmap("tab10")
    cells = sorted({cell for cell, _ in data})
    for ax, series in zip(axes[0], series_list):
        for i, cell in enumerate(cells):
            tokens = data.get((cell, series))
            if not tokens:
                continue
            by_pos: dict[int, list[float]] = defaultdict(list)
            for p, d in zip(tokens["pos"], tokens["delta"]):
                by_pos[int(p)].append(abs(d))
            positions = sorted(k for k, v in by_pos.items() if len(v) >= 3)
            if not positions:
                continue
            mean = [max(sum(by_pos[p]) / len(by_pos[p]), FLOOR) for p in positions]
            worst = [max(max(by_pos[p]), FLOOR) for p in positions]
            ax.plot(positions, mean, "-o", ms=3, color=cmap(i % 10), label=f"{cell} mean")
            ax.plot(positions, worst, ":", color=cmap(i % 10), label=f"{cell} max")
        ax.set_yscale("log")
        ax.set_title(series)
        ax.set_xlabel("generated position (0 = first completion token)")
        ax.set_ylabel(f"|Δ| (nats; exact agreement drawn at {FLOOR:g})")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, ncol=2, loc="best")
    _title(fig, "Error by position: mean (solid) and max (dotted) |Δ|", run)
    fig.tight_layout()
    path = out / "error_by_position.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def trend(runs: list[Run], out: Path) -> Path:
    """max |Δ| and mean |Δ| per cell across runs (x: run label in the order given)."""
    plt = _pyplot()
    fig, (ax_max, ax_mean) = plt.subplots(1, 2, figsize=(14, 4.8))
    cmap = plt.get_cmap("tab10")
    xs = list(range(len(runs)))
    tokens = [_tokens(run) for run in runs]
    keys = sorted({k for t in tokens for k in t}, key=lambda k: (k[0], k[1]))
    cells = sorted({cell for cell, _ in keys})
    styles = {"parity": "-o", "replay vs reference": "-o", "vs golden": "--s"}
    for cell, series in keys:
        i = cells.index(cell)
        worst, mean = [], []
        for t in tokens:
            deltas = [abs(d) for d in t.get((cell, series), {}).get("delta", [])]
            worst.append(max(max(deltas), FLOOR) if deltas else math.nan)
            mean.append(max(sum(deltas) / len(deltas), FLOOR) if deltas else math.nan)
        label = f"{cell} ({series})"
        ax_max.plot(xs, worst, styles.get(series, "-o"), color=cmap(i % 10), label=label)
        ax_mean.plot(xs, mean, styles.get(series, "-o"), color=cmap(i % 10), label=label)
    for ax, name in ((ax_max, "max |Δ|"), (ax_mean, "mean |Δ|")):
        ax.set_yscale("log")
        ax.set_xticks(xs, [run.label for run in runs], fontsize=8)
        ax.set_ylabel(f"{name} (nats)")
        ax.set_title(f"{name} per cell across runs")
        ax.grid(True, alpha=0.3)
    ax_mean.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle("Trend across runs / versions (solid: engine vs fp32 reference; dashed: vs golden)", fontsize=12)
    fig.tight_layout()
    path = out / "trend.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def all_plots(runs: list[Run], out: Path) -> list[Path]:
    """The three per-run plots of the last run, plus the trend when there are several runs."""
    latest = runs[-1]
    paths = [delta_histograms(latest, out), abs_delta_vs_probability(latest, out), error_by_position(latest, out)]
    if len(runs) > 1:
        paths.append(trend(runs, out))
    return paths
