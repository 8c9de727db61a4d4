"""Compare an engine's returned values with the contract over the fp32 reference, and explain the verdict.

:func:`check_parity` is the one comparison the suite (and users' own tests) run: given the engine's
samples, the reference raw logits for the same tokens, the sampling spec and what the numbers are
supposed to mean, it returns a :class:`ParityReport` whose ``passed`` is the verdict and whose
:meth:`~ParityReport.explain` names the layer that broke, the worst tokens and the metrics.

Layers:

* ``semantic``: the numbers mean something else (they match another semantics or a step-order variant
  of one contract step (:data:`contract.VARIANTS`), carry a systematic offset, a masked token was sampled,
  a greedy token is not the argmax, a sampled value is missing; or, found by the fixture's ablation
  (:mod:`conformance.diagnosis`), the failure goes away when a sampling parameter is reset).
* ``inference-path``: same meaning, different computation (noise beyond the cell's tolerance).
* ``objective``: the declared trainer cannot equal what was sampled (:func:`contract.objective_mismatch`).
* ``engine``: the engine crashed or rejected the request (reported by the suite, not here).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from conformance import contract
from conformance.contract import ProcessedDistribution
from conformance.engines.base import Sample
from conformance.metrics import ParityMetrics, bias_excess, compute_metrics
from conformance.spec import (
    LOGPROBS_MODES,
    TRAINER_SEMANTICS,
    LogprobsMode,
    SamplingSpec,
    TokenContext,
    TrainerSemantics,
)
from conformance.tolerances import Tolerance

if TYPE_CHECKING:
    from conformance.diagnosis import Diagnosis
    from conformance.rl_metrics import RLFrameworkMetrics

Layer = Literal["semantic", "inference-path", "objective", "engine"]
Target = LogprobsMode | TrainerSemantics


@dataclass(frozen=True)
class TokenRow:
    """One compared value: where, which token, the engine's value and the legitimate range."""

    sequence: int
    position: int
    token: int
    kind: Literal["sampled", "top"]
    engine: float
    expected: float
    low: float
    high: float

    @property
    def residual(self) -> float:
        """Signed distance (expected − engine) from the engine value to [low, high]; 0 inside."""
        if self.excess == 0.0:
            return 0.0
        return self.low - self.engine if self.engine < self.low else self.high - self.engine

    @property
    def excess(self) -> float:
        """Distance of the engine value from [low, high] (0 inside); -inf is also legitimate for a
        boundary token, which the engine may have masked."""
        if self.engine == self.low or self.engine == self.high:
            return 0.0
        if self.engine == -math.inf and (self.ambiguous or self.underflows):
            return 0.0
        if self.low <= self.engine <= self.high:
            return 0.0
        return min(abs(self.engine - self.low), abs(self.engine - self.high))

    ambiguous: bool = False
    """The token's own membership in the surviving set is within the precision band (a boundary token)."""
    underflows: bool = False
    """A top-n token whose processed probability fp32 holds as 0 (logprob < ``contract.FP32_LOG_TINY``): -inf
    is legitimate for it (and, if the truncation drops it but the engine kept it, its value among the
    survivors is the range: :func:`contract.zero_probability_kept_interval`)."""


@dataclass
class ParityReport:
    """The verdict of one check and everything needed to act on a failure."""

    cell: str
    spec: SamplingSpec
    target: Target
    tolerance: Tolerance
    metrics: ParityMetrics
    """RL metrics of the point values (what a trainer would see against this engine)."""
    residual: ParityMetrics
    """The same metrics of the residuals (distance to the legitimate range): what the verdict bounds."""
    top_max_abs: float
    rows: list[TokenRow]
    boundary_tokens: int
    sequences: int
    passed: bool = True
    layer: Layer | None = None
    reasons: list[str] = field(default_factory=list)
    alternatives: dict[str, float] = field(default_factory=dict)
    variant: str | None = None
    """The step-order variant (:data:`contract.VARIANTS`) whose values match the engine's within tolerance
    when the contract's do not; None when none does (or a whole other semantics matches better)."""
    variant_ties: list[str] = field(default_factory=list)
    """Other variants (or semantics) that fit within tolerance too: the values cannot tell them apart."""
    matched: str | None = None
    """The other semantics or variant that explains the failure (a key of ``alternatives``), or None."""
    diagnosis: Diagnosis | None = None
    """Set by the ``parity`` fixture on a failing check: the ablation (which parameters it needs) and
    the upstream reproduction script (:mod:`conformance.diagnosis`)."""
    engine_description: str = ""
    decode: Callable[[int], str] | None = None
    known: str | None = None
    """Set on a failed check that a known divergence finding covers: the finding's explanation (its id,
    summary and reproduction); the test is then xfailed for it instead of failed."""

    @property
    def unexplained(self) -> bool:
        """Failed, and no known finding covers it."""
        return not self.passed and self.known is None

    def worst(self, count: int = 5) -> list[TokenRow]:
        return sorted(self.rows, key=lambda r: -r.excess)[:count]

    def rl_metrics(self) -> RLFrameworkMetrics | None:
        """What TRL, verl and NeMo-RL would log for these sampled tokens (Δ = expected − engine per
        sequence, finite values only; :mod:`conformance.rl_metrics`), None when nothing was compared."""
        from conformance.rl_metrics import rl_framework_metrics

        per_seq: dict[int, tuple[list[float], list[float]]] = {}
        for r in self.rows:
            if r.kind == "sampled" and math.isfinite(r.engine) and math.isfinite(r.expected):
                expected, engine = per_seq.setdefault(r.sequence, ([], []))
                expected.append(r.expected)
                engine.append(r.engine)
        if not per_seq:
            return None
        return rl_framework_metrics([e for e, _ in per_seq.values()], [g for _, g in per_seq.values()])

    def as_record(self) -> dict[str, object]:
        """A JSON-ready summary (no per-token rows beyond the worst five)."""
        rl = self.rl_metrics()
        return {
            "cell": self.cell,
            "params": self.spec.to_kwargs(),
            "target": self.target,
            "passed": self.passed,
            "known": self.known,
            "layer": self.layer,
            "reasons": self.reasons,
            "metrics": self.metrics.as_dict(),
            "residual": self.residual.as_dict(),
            "top_max_abs": self.top_max_abs,
            "boundary_tokens": self.boundary_tokens,
            "sequences": self.sequences,
            "alternatives": self.alternatives,
            "variant": self.variant,
            **(self.diagnosis.as_record() if self.diagnosis is not None else {}),
            "tolerance": self.tolerance.__dict__,
            "worst": [r.__dict__ | {"excess": r.excess} for r in self.worst()],
            "tokens": self.token_series(),
            "rl": rl.columns() if rl is not None else None,
        }

    def token_series(self) -> dict[str, list[float]]:
        """Per sampled token with finite values, compact (4 significant digits): position ``pos``,
        Δ = expected − engine ``delta`` and the expected probability ``p`` (for the report's plots)."""
        rows = [r for r in self.rows if r.kind == "sampled" and math.isfinite(r.engine) and math.isfinite(r.expected)]
        return {
            "pos": [r.position for r in rows],
            "delta": [float(f"{r.expected - r.engine:.4g}") for r in rows],
            "p": [float(f"{math.exp(r.expected):.4g}") for r in rows],
        }

    def explain(self) -> str:
        verdict = "passed" if self.passed else f"FAILED [layer: {self.layer}]"
        lines = [
            f"logprob parity {verdict} in cell {self.cell!r}"
            + (f" ({self.engine_description})" if self.engine_description else ""),
            f"  params: {self.spec.describe()}",
            f"  compared against: {_TARGET_TEXT.get(self.target, self.target)}",
        ]
        if self.known:
            lines.append(f"  covered by a {self.known}")
        lines += [f"  why: {r}" for r in self.reasons]
        if self.diagnosis is not None:
            lines += ["  " + line for line in self.diagnosis.lines()]
        semantics = {k: v for k, v in self.alternatives.items() if k not in contract.VARIANTS}
        variants = {k: v for k, v in self.alternatives.items() if k in contract.VARIANTS}
        if semantics:
            alts = ", ".join(f"{k}: {v:.3g}" for k, v in sorted(semantics.items(), key=lambda kv: kv[1]))
            lines.append(f"  max |Δ| of sampled tokens under each semantics: {alts}")
        if variants:
            alts = ", ".join(f"{k}: {v:.3g}" for k, v in sorted(variants.items(), key=lambda kv: kv[1]))
            lines.append(f"  max |Δ| under each step-order variant active here: {alts}")
        t = self.tolerance
        lines.append(
            f"  metrics over {self.sequences} sequences: {self.metrics.summary()} "
            f"top-n max|Δ|={self.top_max_abs:.3g} boundary tokens={self.boundary_tokens}"
        )
        rl = self.rl_metrics() if not self.passed else None
        if rl is not None:
            lines.append(f"  what RL frameworks would log: {rl.summary()}")
        if self.residual.n and self.residual.mean_abs != self.metrics.mean_abs:
            lines.append(
                f"  residuals (distance to the legitimate range, what the tolerance bounds): "
                f"mean|Δ|={self.residual.mean_abs:.3g} meanΔ={self.residual.mean_signed:+.3g}"
            )
        lines.append(
            f"  tolerance ({self.cell}): max|Δ|≤{t.max_abs:g} mean|Δ|≤{t.mean_abs:g} "
            f"|meanΔ|≤{t.bias:g}+4σ/√n band={t.band:g}"
        )
        worst = self.worst()
        if worst:
            lines.append("  worst tokens (seq, position, token: engine vs expected [legitimate range]):")
            for r in worst:
                text = f" {self.decode(r.token)!r}" if self.decode else ""
                rng = "" if r.low == r.high else f" [{r.low:.6g}, {r.high:.6g}]"
                lines.append(
                    f"    seq {r.sequence} pos {r.position} token {r.token}{text} ({r.kind}): "
                    f"engine {r.engine:.6g} vs expected {r.expected:.6g}{rng}  |Δ|={r.excess:.3g}"
                )
        return "\n".join(lines)


_TARGET_TEXT: dict[str, str] = {
    "processed_logprobs": "the cell's mode processed_logprobs (contract steps 1-11 over the fp32 reference)",
    "processed_logits": "the cell's mode processed_logits (contract steps 1-10 over the fp32 reference)",
    "raw_logprobs": "the cell's mode raw_logprobs (log_softmax of the fp32 reference logits)",
    "raw_logits": "the cell's mode raw_logits (the fp32 reference logits)",
    "processed": "a 'processed' trainer (the sampler's renormalised distribution)",
    "temperature-only": "a 'temperature-only' trainer (full-vocabulary log_softmax(logits / T))",
    "raw": "a 'raw' trainer (log_softmax(logits))",
}
_PROCESSED_LOGPROB_TARGETS = ("processed_logprobs", "processed")


@dataclass(frozen=True)
class SequenceInput:
    """One engine sample with the reference logits and context needed to judge it."""

    sample: Sample
    raw_logits: torch.Tensor
    context: TokenContext


def _target_values(target: Target, dist: ProcessedDistribution, raw: torch.Tensor, spec: SamplingSpec) -> torch.Tensor:
    if target in LOGPROBS_MODES:
        return contract.mode_values(dist, raw, target)
    return contract.trainer_values(raw, dist, spec, target)  # type: ignore[arg-type]


def _range(
    target: Target, dist: ProcessedDistribution, values: torch.Tensor, pos: int, token: int
) -> tuple[float, float]:
    point = float(values[pos, token])
    if target in _PROCESSED_LOGPROB_TARGETS:
        return contract.logprob_interval(dist, pos, token)
    if target == "processed_logits" and bool(dist.maybe[pos, token]) and not bool(dist.sure[pos, token]):
        return (-math.inf, float(dist.scaled[pos, token]))
    return (point, point)


def _one_position_late(values: torch.Tensor, output_ids: Sequence[int]) -> torch.Tensor:
    """Row ``pos`` filled with the value of the token sampled at ``pos - 1`` (row 0 unchanged): what a
    reporting off-by-one returns for the sampled token."""
    table = values.clone()
    for pos in range(1, min(len(output_ids), table.shape[0])):
        table[pos, :] = values[pos - 1, output_ids[pos - 1]]
    return table


AlternativeFn = Callable[[ProcessedDistribution, torch.Tensor, SamplingSpec, TokenContext, Sequence[int]], torch.Tensor]
_PROCESSED_TARGETS = ("processed_logprobs", "processed_logits", "processed")


def _variant_alternatives(spec: SamplingSpec, target: Target) -> dict[str, AlternativeFn]:
    """The step-order variants (:data:`contract.VARIANTS`) that can differ from the contract under
    ``spec``, as values of ``target``'s kind (logits for ``processed_logits``, else logprobs); none for a
    raw or temperature-only target, whose values no sampler step touches."""
    if target not in _PROCESSED_TARGETS:
        return {}
    logits = target == "processed_logits"

    def values(name: str) -> AlternativeFn:
        variant = contract.VARIANTS[name]

        def fn(
            d: ProcessedDistribution, raw: torch.Tensor, sp: SamplingSpec, ctx: TokenContext, out: Sequence[int]
        ) -> torch.Tensor:
            dist = variant.distribution(raw, out, sp, ctx)
            return dist.logits if logits else dist.logprobs

        return fn

    return {name: values(name) for name in contract.active_variants(spec)}


def _alternatives(spec: SamplingSpec) -> dict[str, AlternativeFn]:
    """Other meanings an engine's numbers may have; each maps (dist, raw, spec, ctx, out) -> values."""
    stripped = replace(
        spec,
        allowed_token_ids=None,
        bad_words=(),
        min_tokens=0,
        logit_bias=(),
        repetition_penalty=1.0,
        frequency_penalty=0.0,
        presence_penalty=0.0,
    )
    double_t = replace(spec, temperature=spec.effective_temperature**2) if not spec.greedy else spec
    no_t = replace(spec, temperature=1.0) if not spec.greedy else spec

    def renormalised(s: SamplingSpec) -> Callable[..., torch.Tensor]:
        return lambda d, raw, sp, ctx, out: contract.processed_distribution(raw, out, s, ctx).logprobs

    return {
        "raw_logprobs": lambda d, raw, sp, ctx, out: torch.log_softmax(raw.float(), dim=-1),
        "raw_logits": lambda d, raw, sp, ctx, out: raw.float(),
        "processed_logprobs": lambda d, raw, sp, ctx, out: d.logprobs,
        "processed_logits": lambda d, raw, sp, ctx, out: d.logits,
        "temperature-only": lambda d, raw, sp, ctx, out: torch.log_softmax(
            raw.float() / sp.effective_temperature, dim=-1
        ),
        "processed, not renormalised after truncation": lambda d, raw, sp, ctx, out: torch.log_softmax(
            d.scaled, dim=-1
        ).masked_fill(~d.kept, -math.inf),
        "processed without penalties/bias/masks": renormalised(stripped),
        "processed with temperature applied twice": renormalised(double_t),
        "processed without temperature": renormalised(no_t),
        "processed, sampled-token values one position late": lambda d, raw, sp, ctx, out: _one_position_late(
            d.logprobs, out
        ),
    }


MIN_BIAS_TOKENS = 8
"""The bias test and the mean-|Δ| bound need at least this many compared tokens (below, a mean is a few
tokens' noise: the GPU fp32 cell's one-token checks at |Δ| 0.0033-0.005 read as "mean |Δ| > 0.003" although
the per-token bound is 0.025; the max bound still judges every token)."""

_TEMPERATURE_TARGETS = ("processed_logprobs", "processed_logits", "processed", "temperature-only")


def scaled_tolerance(tolerance: Tolerance, spec: SamplingSpec, target: Target) -> Tolerance:
    """The tolerance for values computed at temperature T: logit noise δ becomes δ/T after scaling.

    Bounds are stated for T >= 1; for T < 1 every logprob bound is divided by T (the precision band is
    in raw-logit units and is scaled inside the contract). Raw targets do not depend on T.
    """
    if target not in _TEMPERATURE_TARGETS or spec.effective_temperature >= 1.0:
        return tolerance
    factor = 1.0 / spec.effective_temperature
    return replace(
        tolerance,
        max_abs=tolerance.max_abs * factor,
        mean_abs=tolerance.mean_abs * factor,
        bias=tolerance.bias * factor,
    )


AltInput = tuple[ProcessedDistribution, torch.Tensor, TokenContext, Sequence[int], list[tuple[int, int, float]]]
"""(dist, raw, context, output ids, [(position, token, engine value)]) of one sequence's finite sampled values:
the other semantics are evaluated on them only if the check fails (they cost contract passes). A token the
contract masks even within the precision band counts too (its distance under the contract is inf: the
variant that keeps it is what explains it); a masked token the band would allow (boundary) does not."""


def _score_sequence(
    s_index: int, seq: SequenceInput, spec: SamplingSpec, target: Target, tolerance: Tolerance
) -> tuple[list[TokenRow], list[str], AltInput]:
    """One sequence's token rows (sampled and top-n, each with its legitimate range), its semantic
    violations (missing/NaN values, sampled tokens the contract masks, a greedy token that is not the
    argmax) and its input to the alternative semantics."""
    rows: list[TokenRow] = []
    violations: list[str] = []
    sample, raw = seq.sample, seq.raw_logits
    dist = contract.processed_distribution(raw, sample.output_ids, spec, seq.context, band=tolerance.band)
    values = _target_values(target, dist, raw, spec)
    finite_sampled: list[tuple[int, int, float]] = []
    for pos, token in enumerate(sample.output_ids):
        engine_value = sample.sampled_values[pos] if pos < len(sample.sampled_values) else None
        if engine_value is None:
            violations.append(f"seq {s_index} pos {pos}: no value returned for the sampled token {token}")
            continue
        if math.isnan(engine_value):
            violations.append(f"seq {s_index} pos {pos}: the engine returned NaN for the sampled token {token}")
            continue
        if not bool(dist.maybe[pos, token]):
            violations.append(
                f"seq {s_index} pos {pos}: sampled token {token} is masked by the contract "
                f"(processed logprob -inf even within the precision band)"
            )
        if spec.greedy:
            row = dist.shaped[pos]
            gap = float(row.max() - row[token])
            if gap > 2 * tolerance.band:
                violations.append(
                    f"seq {s_index} pos {pos}: greedy token {token} is not the argmax of the processed "
                    f"logits (argmax {int(row.argmax())}, logit gap {gap:.3g} > 2·band)"
                )
        low, high = _range(target, dist, values, pos, token)
        ambiguous = not bool(dist.sure[pos, token])
        expected = float(values[pos, token])
        rows.append(TokenRow(s_index, pos, token, "sampled", engine_value, expected, low, high, ambiguous))
        if math.isfinite(engine_value) and (math.isfinite(expected) or not bool(dist.maybe[pos, token])):
            finite_sampled.append((pos, token, engine_value))
        top = sample.top_values[pos] if pos < len(sample.top_values) else {}
        for t, v in top.items():
            if t == token:
                continue
            if math.isnan(v):
                violations.append(f"seq {s_index} pos {pos}: the engine returned NaN for top token {t}")
                continue
            low, high = _range(target, dist, values, pos, t)
            expected = float(values[pos, t])
            ambiguous = bool(dist.maybe[pos, t]) and not bool(dist.sure[pos, t])
            underflows = target in _PROCESSED_TARGETS and float(dist.logprobs[pos, t]) < contract.FP32_LOG_TINY
            if target in _PROCESSED_LOGPROB_TARGETS and math.isfinite(v) and not bool(dist.maybe[pos, t]):
                kept = contract.zero_probability_kept_interval(dist, pos, t)
                if kept is not None:  # a zero-probability token the truncation may keep: judged by its value
                    low, high = kept
                    expected = high
            rows.append(TokenRow(s_index, pos, t, "top", v, expected, low, high, ambiguous, underflows))
    return rows, violations, (dist, raw, seq.context, sample.output_ids, finite_sampled)


def _numeric_reasons(rows: Sequence[TokenRow], residual: ParityMetrics, tolerance: Tolerance) -> tuple[list[str], bool]:
    """The tolerance bounds the residuals exceed (max, mean, systematic offset) and whether the offset is one."""
    max_excess = max((r.excess for r in rows), default=0.0)
    numeric: list[str] = []
    if max_excess > tolerance.max_abs:
        numeric.append(f"max |Δ| {max_excess:.3g} > {tolerance.max_abs:g}")
    # a mean over fewer tokens than the bias test needs is one token's noise, which the max bound judges
    if residual.n >= MIN_BIAS_TOKENS and residual.mean_abs > tolerance.mean_abs:
        numeric.append(f"mean |Δ| {residual.mean_abs:.3g} > {tolerance.mean_abs:g}")
    biased = residual.n >= MIN_BIAS_TOKENS and bias_excess(residual, tolerance.bias, noise_floor=tolerance.mean_abs) > 0
    if biased:
        numeric.append(
            f"systematic offset: mean Δ {residual.mean_signed:+.3g} exceeds {tolerance.bias:g} + 4σ/√n "
            f"({tolerance.bias + 4 * max(residual.std, tolerance.mean_abs) / math.sqrt(residual.n):.3g})"
        )
    return numeric, biased


def check_parity(
    sequences: Sequence[SequenceInput],
    spec: SamplingSpec,
    target: Target,
    tolerance: Tolerance,
    cell: str,
    engine_description: str = "",
    trainer_declared: bool = False,
    decode: Callable[[int], str] | None = None,
) -> ParityReport:
    """Judge every returned value of ``sequences`` against ``target`` within ``tolerance``.

    ``target`` is the cell's logprobs mode (engine self-conformance) or a trainer semantics (the user's
    contract). Sampled tokens feed the metrics; top-n values are checked against ``max_abs`` too. A failure
    gets its layer: semantic (a violation, another semantics or variant that matches, a systematic
    offset), objective (a declared trainer semantics no engine can match) or inference-path (the rest).
    """
    rows: list[TokenRow] = []
    violations: list[str] = []
    alt_inputs: list[AltInput] = []
    for s_index, seq in enumerate(sequences):
        seq_rows, seq_violations, alt_input = _score_sequence(s_index, seq, spec, target, tolerance)
        rows += seq_rows
        violations += seq_violations
        alt_inputs.append(alt_input)

    tolerance = scaled_tolerance(tolerance, spec, target)
    sampled = [r for r in rows if r.kind == "sampled"]
    metrics = compute_metrics(np.array([r.expected for r in sampled]), np.array([r.engine for r in sampled]))
    finite = [r for r in sampled if math.isfinite(r.engine) and math.isfinite(r.residual)]
    residual = compute_metrics(np.array([r.engine + r.residual for r in finite]), np.array([r.engine for r in finite]))
    top_excess = [r.excess for r in rows if r.kind == "top"]
    report = ParityReport(
        cell=cell,
        spec=spec,
        target=target,
        tolerance=tolerance,
        metrics=metrics,
        residual=residual,
        top_max_abs=max(top_excess, default=0.0),
        rows=rows,
        boundary_tokens=sum(r.ambiguous for r in sampled),
        sequences=len(sequences),
        engine_description=engine_description,
        decode=decode,
    )
    reasons = list(violations[:5])
    if len(violations) > 5:
        reasons.append(f"... and {len(violations) - 5} more such violations")
    numeric, biased = _numeric_reasons(rows, residual, tolerance)
    if not reasons and not numeric:
        return report
    report.passed = False
    report.alternatives = _alternative_distances(spec, alt_inputs, target)
    objective = contract.objective_mismatch(spec, target) if trainer_declared and target in TRAINER_SEMANTICS else None
    if objective and not violations:
        report.layer = "objective"
        report.reasons = [objective + " (no engine can match it)"] + numeric
        return report
    report.reasons = reasons + numeric
    matches = _matching_alternative(report, target, tolerance)
    if matches:  # a violation is semantic by itself; a matching semantics (if any) says which bug explains it
        report.reasons.insert(0, matches)
    report.layer = "semantic" if violations or matches or biased else "inference-path"
    return report


def _alternative_distances(
    spec: SamplingSpec,
    inputs: Sequence[AltInput],
    target: Target = "processed_logprobs",
) -> dict[str, float]:
    """Max |Δ| of the finite sampled values under each alternative semantics and each step-order variant
    active under ``spec`` (empty when there are no finite sampled values)."""
    if not any(values for *_, values in inputs):
        return {}
    worst: dict[str, float] = {}
    for name, fn in {**_alternatives(spec), **_variant_alternatives(spec, target)}.items():
        deltas = []
        for dist, raw, context, output_ids, values in inputs:
            if not values:
                continue
            table = fn(dist, raw, spec, context, output_ids)
            deltas += [abs(float(table[pos, token]) - engine) for pos, token, engine in values]
        worst[name] = float(np.nanmax(deltas)) if deltas else math.inf
    return worst


def _matching_alternative(report: ParityReport, target: Target, tolerance: Tolerance) -> str | None:
    """The explanation of a failure by another semantics or a step-order variant, or None.

    Only a candidate that fits within tolerance *and* clearly better than the target (under half its max
    |Δ|) explains a failure. Of several, the closest is named (whole semantics before variants, then the
    registry's order, on equal distance); the others that fit are listed as indistinguishable here. Sets
    ``report.variant`` (and ``variant_ties``) when the explanation is a variant.
    """
    own = {"processed": "processed_logprobs", "raw": "raw_logprobs"}.get(str(target), str(target))
    own_value = report.alternatives.get(own, math.inf)
    names = list(report.alternatives)
    fits = sorted(
        (
            (v, names.index(k), k)
            for k, v in report.alternatives.items()
            if k != own and math.isfinite(v) and v <= tolerance.max_abs and v < 0.5 * own_value
        ),
    )
    if not fits:
        return None
    value, _, name = fits[0]
    others = [k for _, _, k in fits[1:]]
    report.matched = name
    if name in contract.VARIANTS:
        variant = contract.VARIANTS[name]
        report.variant, report.variant_ties = name, others
        text = (
            f"the engine's values match the step-order variant {name!r} ({variant.description}; max |Δ| "
            f"{value:.3g}) instead of the contract's {own!r} (max |Δ| {own_value:.3g})"
        )
    else:
        text = f"the engine's values match {name!r} (max |Δ| {value:.3g}) instead of {own!r} (max |Δ| {own_value:.3g})"
    if others:
        text += "; indistinguishable here: " + ", ".join(repr(k) for k in others)
    return text
