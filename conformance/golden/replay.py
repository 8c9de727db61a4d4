"""Record golden cases on a running engine, and verify a newer engine build against them.

Verification is *teacher-forced*: the engine scores the prompt followed by the golden completion with
full-vocabulary ``prompt_logprobs`` (raw, T=1, whatever the logprobs mode), so a token that a new build
would sample differently cannot derail the comparison. The contract (:mod:`conformance.contract`) turns
those raw logprobs into the cell's mode for the golden tokens (exact for temperature, top-k/p, min-p and
additive penalties: they are shift-invariant, and raw logprobs are the logits up to a per-position
constant). Two checks come out of every case, both :class:`~conformance.parity.ParityReport`:

* **golden**: the golden values against the new build's replay (Δ = replay − golden), within the
  tolerance stored with the golden (per cell, editable in the manifest like pytest-regressions' data);
* **reference**: the new build's replay against the fp32 HF reference over the same tokens, within the
  cell's tolerance (the regular parity check).

The case is also re-generated with its own parameters: for greedy cases the exact token agreement rate
must reach the entry's ``min_token_agreement``; for every case the values of the re-generated tokens that
agree with the golden prefix are compared directly (this also covers a change in the *processing* that a
raw replay cannot see).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from conformance import contract
from conformance.engines.base import EngineFailure, Request, Sample
from conformance.golden.store import GOLDEN_PROMPT_TOKENS, GoldenCase, GoldenError
from conformance.parity import ParityReport, SequenceInput, check_parity, scaled_tolerance
from conformance.runner import ParityRunner
from conformance.spec import SamplingSpec

MIN_TOKEN_AGREEMENT = {"float32": 1.0, "lower": 0.5}
"""Default greedy token agreement a build must reach: exact in fp32; in bf16/fp16 one near-tie flip
early in a 16-token sequence changes every later position, so half the positions is the bound."""


def default_min_agreement(dtype: str) -> float:
    return MIN_TOKEN_AGREEMENT["float32" if dtype == "float32" else "lower"]


def record_case(runner: ParityRunner, spec: SamplingSpec, prompt_indices: tuple[int, ...]) -> GoldenCase:
    """Generate ``spec`` on the runner's engine for the given prompts (cut to the golden length)."""
    prompts = [runner.prompts.ids[i][:GOLDEN_PROMPT_TOKENS] for i in prompt_indices]
    samples = [group[0] for group in runner.generate([Request(p, spec) for p in prompts])]
    tops = [
        [{t: v for t, v in top.items() if t != tok} for tok, top in zip(s.output_ids, s.top_values)] for s in samples
    ]
    values = [[math.nan if v is None else float(v) for v in s.sampled_values] for s in samples]
    return GoldenCase(spec, prompts, [list(s.output_ids) for s in samples], values, tops)


@dataclass
class GoldenVerdict:
    """Outcome of verifying one golden case against the running engine."""

    case: str
    golden: ParityReport
    reference: ParityReport
    token_agreement: float
    """Positional exact agreement of re-generated tokens with the golden tokens (all cases)."""
    min_token_agreement: float | None
    """The bound it must reach (greedy cases only; None: informative)."""
    direct_max_abs: float
    """max |Δ| between golden values and re-generated values over the agreeing prefixes."""
    direct_bound: float
    recorded: dict[str, Any]
    current: dict[str, Any]

    @property
    def passed(self) -> bool:
        agreement_ok = self.min_token_agreement is None or self.token_agreement >= self.min_token_agreement
        return (
            self.golden.passed
            and self.reference.passed
            and agreement_ok
            and not self.direct_max_abs > self.direct_bound
        )

    def as_record(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "token_agreement": self.token_agreement,
            "min_token_agreement": self.min_token_agreement,
            "direct_max_abs": self.direct_max_abs,
            "direct_bound": self.direct_bound,
            "recorded_versions": self.recorded,
            "verdict": "pass" if self.passed else "fail",
        }

    def explain(self) -> str:
        rec = ", ".join(f"{k} {v}" for k, v in self.recorded.items())
        cur = ", ".join(f"{k} {v}" for k, v in self.current.items())
        lines = [
            f"golden case {self.case!r} in cell {self.golden.cell!r}: {'passed' if self.passed else 'FAILED'}",
            f"  recorded with: {rec}",
            f"  verified with: {cur}",
        ]
        agree = f"  token agreement of a re-generation: {self.token_agreement:.3f}"
        if self.min_token_agreement is not None:
            verdict = "ok" if self.token_agreement >= self.min_token_agreement else "FAILED"
            agree += f" (greedy: must be ≥ {self.min_token_agreement:g}: {verdict})"
        lines.append(agree)
        lines.append(
            f"  re-generated values on the agreeing prefix: max |Δ| {self.direct_max_abs:.3g} "
            f"(bound {self.direct_bound:g}){'' if not self.direct_max_abs > self.direct_bound else ': FAILED'}"
        )
        lines.append("  drift against the golden values (teacher-forced replay − golden):")
        lines += ["    " + line for line in self.golden.explain().splitlines()]
        lines.append("  drift against the fp32 reference (replay vs reference):")
        lines += ["    " + line for line in self.reference.explain().splitlines()]
        return "\n".join(lines)


def _replay_logits(runner: ParityRunner, golden: GoldenCase, vocab: int) -> list[torch.Tensor]:
    """Raw logprobs ``[len(completion), vocab]`` of each golden sequence, teacher-forced."""
    forced = SamplingSpec(temperature=0.0, max_tokens=1, logprobs=0)
    requests = [
        Request(tuple(p) + tuple(c), forced, prompt_logprobs=vocab) for p, c in zip(golden.prompts, golden.completions)
    ]
    try:
        samples = runner.generate(requests)
    except EngineFailure as exc:
        if "max allowed" in exc.reason or "max_logprobs" in exc.reason:
            raise GoldenError(
                f"cell {runner.cell.id}: golden replay needs full-vocabulary prompt logprobs ({vocab}); give the "
                f"cell engine_kwargs = {{ max_logprobs = -1 }} ({exc.reason[:160]})"
            ) from None
        raise
    out = []
    for (prompt, completion), group in zip(zip(golden.prompts, golden.completions), samples):
        table = torch.full((len(completion), vocab), float("-inf"), dtype=torch.float32)
        values = group[0].prompt_values
        for t in range(len(completion)):
            entry = values[len(prompt) + t] or {}
            ids = [i for i in entry if i < vocab]
            table[t, ids] = torch.tensor([entry[i] for i in ids], dtype=torch.float32)
        out.append(table)
    return out


def _golden_sample(golden: GoldenCase, i: int) -> Sample:
    tops = [{**top, tok: val} for tok, val, top in zip(golden.completions[i], golden.sampled[i], golden.topk[i])]
    values: list[float | None] = [None if math.isnan(v) else v for v in golden.sampled[i]]
    return Sample(tuple(golden.prompts[i]), list(golden.completions[i]), values, tops)


def _replay_sample(
    golden: GoldenCase, i: int, table: torch.Tensor, spec: SamplingSpec, context: Any, mode: str
) -> Sample:
    """The new build's values for the golden tokens (cell's mode, per the contract) and its own top-n."""
    dist = contract.processed_distribution(table, golden.completions[i], spec, context)
    values = contract.mode_values(dist, table, mode)  # type: ignore[arg-type]
    sampled: list[float | None] = [float(values[t, tok]) for t, tok in enumerate(golden.completions[i])]
    k = max(spec.logprobs, 1)
    tops = []
    for t, tok in enumerate(golden.completions[i]):
        top = torch.topk(values[t], k)
        tops.append({int(j): float(v) for j, v in zip(top.indices, top.values)} | {tok: float(values[t, tok])})
    return Sample(tuple(golden.prompts[i]), list(golden.completions[i]), sampled, tops)


def _agreement(golden: GoldenCase, regenerated: list[Sample]) -> tuple[float, float]:
    """(positional token agreement, max |Δ| of values over each agreeing prefix)."""
    same = total = 0
    worst = 0.0
    for gold_ids, gold_vals, sample in zip(golden.completions, golden.sampled, regenerated):
        total += len(gold_ids)
        prefix = True
        for t, tok in enumerate(gold_ids):
            hit = t < len(sample.output_ids) and sample.output_ids[t] == tok
            same += hit
            prefix = prefix and hit
            if prefix:
                new = sample.sampled_values[t]
                if new is not None and math.isfinite(new) and math.isfinite(gold_vals[t]):
                    worst = max(worst, abs(new - gold_vals[t]))
    return (same / total if total else math.nan), worst


def verify_case(
    runner: ParityRunner,
    name: str,
    golden: GoldenCase,
    entry: dict[str, Any],
    current_versions: dict[str, str],
    test: str = "",
) -> GoldenVerdict:
    """Verify one golden case on the runner's engine (see the module docstring); records both checks."""
    cell = runner.cell
    spec = golden.spec
    engine = runner.handle.engine
    tol_fields = entry.get("tolerance") or {}
    tolerance = replace(cell.tolerance, **{k: float(v) for k, v in tol_fields.items()})
    vocab = runner.reference.vocab_size
    tables = _replay_logits(runner, golden, vocab)
    contexts = [engine.token_context(Request(tuple(p), spec)) for p in golden.prompts]
    mode = cell.logprobs_mode
    recorded_vllm = entry.get("versions", {}).get("vllm", "?")
    golden_inputs = [SequenceInput(_golden_sample(golden, i), tables[i], contexts[i]) for i in range(len(tables))]
    golden_report = check_parity(
        golden_inputs,
        spec,
        mode,
        tolerance,
        cell.id,
        engine_description=f"golden from vllm {recorded_vllm} judged against the replay on {engine.description}",
        decode=runner.decode,
    )
    ref_logits = runner.reference.raw_logits([(p, c) for p, c in zip(golden.prompts, golden.completions)])
    replay_inputs = [
        SequenceInput(_replay_sample(golden, i, tables[i], spec, contexts[i], mode), ref_logits[i], contexts[i])
        for i in range(len(tables))
    ]
    reference_report = check_parity(
        replay_inputs,
        spec,
        mode,
        cell.tolerance,
        cell.id,
        engine_description=f"teacher-forced replay on {engine.description}",
        decode=runner.decode,
    )
    regenerated = [g[0] for g in runner.generate([Request(tuple(p), spec) for p in golden.prompts])]
    agreement, direct = _agreement(golden, regenerated)
    min_agree = entry.get("min_token_agreement", default_min_agreement(cell.dtype)) if spec.greedy else None
    verdict = GoldenVerdict(
        case=name,
        golden=golden_report,
        reference=reference_report,
        token_agreement=agreement,
        min_token_agreement=min_agree,
        direct_max_abs=direct,
        direct_bound=scaled_tolerance(tolerance, spec, mode).max_abs,
        recorded=dict(entry.get("versions", {})),
        current=current_versions,
    )
    if runner.recorder is not None:
        extra = verdict.as_record()
        runner.recorder.add(
            f"{test}:golden", golden_report, extra={"golden": {**extra, "compared": "replay-vs-golden"}}
        )
        runner.recorder.add(
            f"{test}:reference", reference_report, extra={"golden": {**extra, "compared": "replay-vs-reference"}}
        )
    return verdict
