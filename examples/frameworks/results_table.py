"""Markdown verdict tables from the examples' matrix records (docs/frameworks.md is made with it).

    cd examples/frameworks/trl && PARITY_FRAMEWORK_RESULTS=/tmp/trl.jsonl pytest tests/test_trl_matrix.py
    python examples/frameworks/results_table.py /tmp/trl.jsonl [more.jsonl ...]

One row per (cell, sampling row), the last record wins. Columns: the cell's engine configuration, the
sampling settings, the kit's verdict (pass, or the layer and its first reason), then the framework's own
numbers on the same samples (its logprob function vs the engine's sampled values: max |Δ|, mean Δ, k3)
and the IS diagnostics TRL, verl and NeMo-RL would log for them (conformance.rl_metrics).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

Record = dict[str, Any]
"""One JSON record of a matrix run."""


def _cause(record: Record) -> str:
    if record["verdict"] == "pass":
        return "pass"
    reasons = [ln.strip()[5:] for ln in record["failure"].splitlines() if ln.strip().startswith("why: ")]
    first = reasons[0] if reasons else record["failure"].splitlines()[0]
    first = re.sub(r" \(no engine can match it\)", "", first)
    first = first.replace("a 'temperature-only' trainer scores a different distribution than the sampler used: ", "")
    return f"**{record['verdict']}**: {first}".replace("|", "\\|")


def _kit_max(record: Record) -> float | None:
    found = re.search(r"max\|Δ\|=([0-9.e+-]+|inf)", record["kit_metrics"])
    return float(found.group(1)) if found else None


def _own(record: Record) -> Record:
    own: Record = record["own"] if "own" in record else record["framework"]  # early records stored it as "framework"
    return own


def _name(record: Record) -> str:
    name = record["framework"] if isinstance(record["framework"], str) else record["cell"].split("-")[0]
    return f"{name} {record['framework_version']}"


def _g(x: float) -> str:
    return f"{x:.3g}"


def table(records: list[Record]) -> str:
    latest: dict[tuple[str, str], Record] = {}
    for r in records:
        latest[(r["cell"], r["row"])] = r
    lines = [
        "| cell (engine) | sampling | kit verdict | max\\|Δ\\| | mean Δ | k3 | TRL IS min/mean/max (seq mask, cap 3) | TRL over cap | verl χ² token | verl IS ESS | NeMo-RL mult err |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    worst = 0.0
    for (cell, _), r in sorted(latest.items()):
        f, rl = _own(r), r["rl"]
        kit_max = _kit_max(r)
        if kit_max is not None and kit_max != float("inf") and f["max_abs"] > 0:
            worst = max(worst, abs(kit_max - f["max_abs"]) / max(f["max_abs"], 1e-4))
        spec = r["spec"].replace("SamplingSpec(", "").rstrip(")")
        spec = re.sub(r", (max_tokens|seed|logprobs)=\d+", "", spec)
        spec = re.sub(r"^(max_tokens|seed|logprobs)=\d+(, )?", "", spec) or "defaults"
        nemo = rl["nemo_mult_prob_error"]
        lines.append(
            f"| {cell} ({r['logprobs_mode']}) | {spec} | {_cause(r)} | {_g(f['max_abs'])} | {f['mean_signed']:+.3g} | "
            f"{_g(f['k3'])} | {r['rl_summary'].split('IS min/mean/max ')[1].split(',')[0]} | {rl['trl_frac_over_cap']:.0%} | "
            f"{_g(rl['verl_chi2_token'])} | {rl['verl_is_ess']:.3f} | {nemo:.4f} ({'ok' if nemo < 1.05 else '> 1.05'}) |"
        )
    lines.append("")
    lines.append(
        f"(the kit's max|Δ| over the sampled tokens, printed to 3 digits, vs the framework's own: largest relative "
        f"difference {worst:.2g}, i.e. equal to the printed precision)"
    )
    return "\n".join(lines)


def main(paths: list[str]) -> None:
    records = [json.loads(line) for p in paths for line in Path(p).read_text().splitlines() if line.strip()]
    by_framework: dict[str, list[Record]] = {}
    for r in records:
        by_framework.setdefault(_name(r), []).append(r)
    for name, group in by_framework.items():
        print(f"### {name}\n")
        print(table(group))
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
