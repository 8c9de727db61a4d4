"""Engine-versus-itself comparisons across an inference-path switch (layer: inference-path).

The same request sent down two paths (cold vs prefix-cache hit, alone vs inside a batch, decode vs a
prefill rescore, one execution mode vs another) must give the same logprobs within the cell's tolerance.
Sampling is greedy or seeded so that both paths choose the same tokens while their values agree; values
are compared position by position until the chosen tokens diverge (a divergence is itself reported).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from conformance.engines.base import Sample


@dataclass(frozen=True)
class PathDelta:
    sequence: int
    position: int
    token: int
    first: float
    second: float

    @property
    def delta(self) -> float:
        if self.first == self.second:
            return 0.0
        return abs(self.first - self.second)


@dataclass
class PathComparison:
    """The verdict of one two-path comparison; ``explain()`` is the failure message."""

    cell: str
    first: str
    second: str
    tolerance: float
    compared: int = 0
    deltas: list[PathDelta] = field(default_factory=list)
    divergences: list[tuple[int, int]] = field(default_factory=list)
    """(sequence, position) where the two paths chose different tokens."""
    missing: list[tuple[int, int, int]] = field(default_factory=list)
    """(sequence, position, token) whose value one path did not return."""
    detail: str = ""

    @property
    def max_abs(self) -> float:
        return max((d.delta for d in self.deltas), default=0.0)

    @property
    def passed(self) -> bool:
        return self.compared > 0 and not self.missing and self.max_abs <= self.tolerance

    def explain(self) -> str:
        verdict = "passed" if self.passed else "FAILED [layer: inference-path]"
        lines = [
            f"path comparison {verdict} in cell {self.cell!r}: {self.second!r} vs {self.first!r}",
            f"  compared {self.compared} values; max |Δ| {self.max_abs:.3g} (tolerance {self.tolerance:g})"
            + (f"; {self.detail}" if self.detail else ""),
        ]
        if self.compared == 0:
            lines.append("  nothing was compared: the two paths returned no common positions")
        if self.missing:
            shown = ", ".join(f"seq {s} pos {p} token {t}" for s, p, t in self.missing[:5])
            lines.append(f"  values missing on one path: {shown}")
        if self.divergences:
            shown = ", ".join(f"seq {s} pos {p}" for s, p in self.divergences[:5])
            lines.append(f"  token choice diverged at: {shown}")
        worst = sorted(self.deltas, key=lambda d: -d.delta)[:5]
        if worst and worst[0].delta > 0:
            lines.append(f"  worst values (seq, position, token: {self.first} vs {self.second}):")
            for d in worst:
                lines.append(
                    f"    seq {d.sequence} pos {d.position} token {d.token}: {d.first:.6g} vs {d.second:.6g} "
                    f"|Δ|={d.delta:.3g}"
                )
        return "\n".join(lines)


def compare_samples(
    first: Sequence[Sample],
    second: Sequence[Sample],
    cell: str,
    names: tuple[str, str],
    tolerance: float,
    detail: str = "",
) -> PathComparison:
    """Compare the sampled and top-n values of paired samples until their tokens diverge."""
    if len(first) != len(second):
        raise ValueError(f"cannot pair {len(first)} samples with {len(second)}")
    result = PathComparison(cell, names[0], names[1], tolerance, detail=detail)
    for index, (a, b) in enumerate(zip(first, second)):
        for pos in range(min(len(a.output_ids), len(b.output_ids))):
            if a.output_ids[pos] != b.output_ids[pos]:
                result.divergences.append((index, pos))
                break
            pairs = [(a.output_ids[pos], a.sampled_values[pos], b.sampled_values[pos])]
            top_a = a.top_values[pos] if pos < len(a.top_values) else {}
            top_b = b.top_values[pos] if pos < len(b.top_values) else {}
            pairs += [(t, v, top_b[t]) for t, v in top_a.items() if t in top_b and t != a.output_ids[pos]]
            for token, va, vb in pairs:
                if va is None or vb is None:
                    result.missing.append((index, pos, token))
                    continue
                result.compared += 1
                result.deltas.append(PathDelta(index, pos, token, va, vb))
    return result


def compare_rescore(decoded: Sample, rescored: Sample, cell: str, tolerance: float) -> PathComparison:
    """Decode-time values of ``decoded``'s tokens vs the prompt values of a rescore of prompt + output."""
    result = PathComparison(cell, "decode", "prefill rescore", tolerance)
    offset = len(decoded.prompt_ids)
    for pos, token in enumerate(decoded.output_ids):
        entry = rescored.prompt_values[offset + pos] if offset + pos < len(rescored.prompt_values) else None
        value = decoded.sampled_values[pos]
        if entry is None or token not in entry or value is None:
            result.missing.append((0, pos, token))
            continue
        result.compared += 1
        result.deltas.append(PathDelta(0, pos, token, value, entry[token]))
    return result
