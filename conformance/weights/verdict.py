"""The verdict on a weight update, and its diagnosis when it failed.

:func:`judge_update` takes an :class:`UpdateCheck` (engine samples after pushing W1 into an engine that
held W0, and everything needed to judge them) and judges the samples against the references under W1 and
W0 through the kit's one judge pipeline (:func:`~conformance.judge.judge_samples`). It passes when the
engine matches W1 within the cell's tolerance *and* is measurably far from W0; a failure is diagnosed as a
no-op update, stale prefix-cache KV, a partial update naming the tensor (and layer) left behind, or, when
no modelled state matches, the first module whose hidden states leave W1's.

In an engine with more than one rank (tensor / pipeline parallel) every update is also checked per rank:
each rank's shards are read back in its worker and compared bit for bit with the slices of W1 it should
hold (:mod:`conformance.weights.shards`). A rank that missed the push, or holds some shards at W0, fails the
update as a weight-sync failure that names the rank and the shards, whatever the logprobs say (in bf16 they
may not see it: docs/parallel.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from conformance.engines.base import Engine, Request, Sample
from conformance.judge import judge_samples
from conformance.parity import ParityReport, Target
from conformance.spec import TokenContext
from conformance.tolerances import Tolerance
from conformance.trainer import Reference
from conformance.weights.shards import ShardCheck, check_ranks
from conformance.weights.state import TrainerStandIn, WeightSet, fused_groups, layer_of

WEIGHT_SYNC_LAYER = "weight-sync"
"""The layer a failed weight update is reported under."""

SEPARATION = 4.0
"""After an update the engine must be at least this many mean-|Δ| tolerances away from the W0 reference,
or W1 is not distinguishable from W0 in this cell and the check proves nothing."""


@dataclass
class UpdateReport:
    """Engine values after an update against the references under the new (W1) and old (W0) weights."""

    cell: str
    path: str
    to_new: ParityReport
    distance_new: float
    distance_old: float
    required_separation: float
    passed: bool
    diagnosis: str = ""
    cached_sequences: int = 0
    layer: str | None = None
    candidates: dict[str, float] = field(default_factory=dict)
    shards: ShardCheck | None = None
    """Every rank's shards against W1 (engines with more than one rank; None otherwise)."""

    def explain(self) -> str:
        verdict = "passed" if self.passed else f"FAILED [layer: {self.layer}]"
        lines = [
            f"weight update via {self.path!r} {verdict} in cell {self.cell!r}",
            (
                f"  mean |Δ| to the reference under the pushed weights (W1): {self.distance_new:.3g} "
                f"(cell tolerance {self.to_new.tolerance.mean_abs:g}; check {'passed' if self.to_new.passed else 'failed'})"
            ),
            (
                f"  mean |Δ| to the reference under the previous weights (W0): {self.distance_old:.3g} "
                f"(must be >= {self.required_separation:.3g})"
            ),
            f"  sequences served partly from the prefix cache: {self.cached_sequences}",
        ]
        if self.diagnosis:
            lines.append(f"  diagnosis: {self.diagnosis}")
        if self.shards is not None:
            lines.append(f"  {self.shards.explain()}")
        if self.candidates:
            best = sorted(self.candidates.items(), key=lambda kv: kv[1])[:3]
            lines.append("  closest single-tensor-stale states: " + ", ".join(f"{n}: {d:.3g}" for n, d in best))
        if not self.to_new.passed:
            lines.append("  check against W1:")
            lines += ["    " + line for line in self.to_new.explain().splitlines()]
        return "\n".join(lines)


@dataclass(frozen=True)
class UpdateCheck:
    """What judging one weight update needs: the probes sent after pushing ``new`` into an engine that held
    ``old``, their samples and token contexts, the trainer stand-in (references under any weights), and how
    to read the values (``target``, ``tolerance``, the ``cell`` and update ``path`` names for messages).
    ``engine`` (optional) lets a failure with no matching weight state be localised by hidden states, and a
    parallel engine's ranks be read back (:mod:`conformance.weights.shards`)."""

    requests: Sequence[Request]
    samples: Sequence[Sequence[Sample]]
    contexts: Sequence[TokenContext]
    trainer: TrainerStandIn
    new: WeightSet
    old: WeightSet
    target: Target
    tolerance: Tolerance
    cell: str
    path: str
    new_reference: Reference | None = None
    old_reference: Reference | None = None
    engine: Engine | None = None

    def judge(self, reference: Reference, keep: Callable[[Sample], bool] | None = None) -> ParityReport | None:
        """The samples (those ``keep`` selects) against ``reference``, through the one judge pipeline."""
        return judge_samples(
            self.requests,
            self.samples,
            reference,
            self.contexts,
            target=self.target,
            tolerance=self.tolerance,
            cell=self.cell,
            keep=keep,
        )

    def reference(self, weights: WeightSet) -> Reference:
        """The reference under ``weights`` (the given one for ``new`` / ``old``, else built by the trainer)."""
        if weights is self.new and self.new_reference is not None:
            return self.new_reference
        if weights is self.old and self.old_reference is not None:
            return self.old_reference
        return self.trainer.reference(weights)


def judge_update(check: UpdateCheck) -> UpdateReport:
    """Judge samples taken after pushing ``check.new`` into an engine that held ``check.old``.

    Passes iff the values match ``new`` within ``tolerance`` (the full parity verdict) and their mean |Δ|
    (distance to the legitimate range) to ``old`` is at least :data:`SEPARATION` mean-|Δ| tolerances. On
    failure the diagnosis says which of these the engine serves: ``old`` entirely (no-op update), ``new``
    except for sequences served from the prefix cache (stale KV), or ``new`` with one tensor left at ``old``
    (partial update; the tensor and its layer are named). When no such state matches and ``check.engine``
    is given, its hidden states are compared with ``new``'s module by module
    (:mod:`conformance.weights.hidden_states`) and the first module that diverges is named.

    With ``check.engine`` running more than one rank, every rank's shards are read back first
    (:func:`~conformance.weights.shards.check_ranks`); a rank not holding its shards of ``new`` fails the
    update with a diagnosis naming the rank and the shards (the logprob diagnosis is then skipped).
    """
    ref_new = check.reference(check.new)
    to_new = check.judge(ref_new)
    to_old = check.judge(check.reference(check.old))
    assert to_new is not None and to_old is not None, "no samples to judge"
    separation = SEPARATION * to_new.tolerance.mean_abs
    cached = sum(1 for group in check.samples for s in group if (s.cached_tokens or 0) > 0)
    report = UpdateReport(
        cell=check.cell,
        path=check.path,
        to_new=to_new,
        distance_new=to_new.residual.mean_abs,
        distance_old=to_old.residual.mean_abs,
        required_separation=separation,
        passed=to_new.passed and to_old.residual.mean_abs >= separation,
        cached_sequences=cached,
    )
    if check.engine is not None:
        report.shards = check_ranks(check.engine, check.new, check.old, check.trainer.config)
        if report.shards is not None and not report.shards.passed:
            report.passed, report.layer, report.diagnosis = False, WEIGHT_SYNC_LAYER, report.shards.diagnosis()
            return report
    coarse = to_new.tolerance.mean_abs >= COARSE_MEAN_ABS
    if report.passed and coarse:
        found = _scan_partial(report, check, closer_than=CLOSER_FACTOR * report.distance_new)
        if found:
            report.passed, report.layer, report.diagnosis = False, WEIGHT_SYNC_LAYER, found
        return report
    if report.passed:
        return report
    report.layer = WEIGHT_SYNC_LAYER
    if to_new.passed:
        report.diagnosis = (
            f"the engine matches W1 but W1 is within {SEPARATION:g} tolerances of W0 in this cell: the update "
            f"is too small to prove it arrived (make the trainer stand-in's step larger)"
        )
        return report
    if to_old.passed:
        report.diagnosis = "the engine still serves W0 everywhere: the update did not reach the model (a no-op update)"
        return report
    if cached:
        uncached = check.judge(ref_new, keep=lambda s: not (s.cached_tokens or 0))
        hits = check.judge(ref_new, keep=lambda s: bool(s.cached_tokens))
        if hits is not None and not hits.passed and (uncached is None or uncached.passed):
            report.diagnosis = (
                f"stale prefix cache: the {cached} sequence(s) served from the prefix cache are off "
                f"(mean |Δ| {hits.residual.mean_abs:.3g}) while the others match W1: KV computed under W0 was "
                f"reused; call reset_prefix_cache() after every weight update"
            )
            return report
    found = _scan_partial(report, check)
    model = getattr(ref_new, "model", None)
    if found is None and check.engine is not None and model is not None:
        prompt = min((r.prompt_ids for r in check.requests), key=len)
        found = _localize(check.engine, model, check.new, prompt, coarse=coarse)
    report.diagnosis = found or NO_STATE_MATCHES
    return report


NO_STATE_MATCHES = (
    "the engine matches neither W1, nor W0, nor W1 with any single tensor or fused group left at W0 or zeroed"
)
"""The diagnosis when no modelled weight state explains the engine (the hidden states may say more)."""


def _localize(
    engine: Engine, model: torch.nn.Module, new: WeightSet, prompt: Sequence[int], coarse: bool
) -> str | None:
    """The diagnosis from the first module whose hidden states leave ``new``'s (None: not capturable)."""
    from conformance.weights.hidden_states import first_divergence

    divergence = first_divergence(engine, model, prompt, coarse)
    if divergence is None:
        return None
    if divergence.first is None:
        return f"{NO_STATE_MATCHES}; {divergence.explain()}"
    tensors = [n.removeprefix(divergence.first + ".") for n in new.tensors if n.startswith(divergence.first + ".")]
    return (
        f"{NO_STATE_MATCHES}; {divergence.explain()}: {layer_of(divergence.first + '.weight')} did not take W1 "
        f"intact (its tensors: {', '.join(tensors) or 'none changed'}; a partial or corrupt update of that module)"
    )


def _partial_states(new: WeightSet, old: WeightSet) -> list[tuple[WeightSet, str]]:
    """The engine states a partial push can leave: each changed tensor at W0 or zeroed, each fused group at W0."""
    states: list[tuple[WeightSet, str]] = []
    changed = new.changed_from(old)
    for name in changed:
        states.append((new.with_tensor_from(old, name), f"{name} ({layer_of(name)}) still at W0"))
        zeroed = WeightSet(
            f"{new.label} with {name} zeroed", {**new.tensors, name: torch.zeros_like(new.tensors[name])}
        )
        states.append((zeroed, f"{name} ({layer_of(name)}) zeroed"))
    for group in fused_groups(changed):
        stale = WeightSet(
            f"{new.label} with {', '.join(group)} at W0", {**new.tensors, **{n: old.tensors[n] for n in group}}
        )
        states.append(
            (
                stale,
                f"the fused group {', '.join(group)} ({layer_of(group[0])}) still at W0 (vLLM loads them into one parameter)",
            )
        )
    return states


def _scan_partial(report: UpdateReport, check: UpdateCheck, closer_than: float | None = None) -> str | None:
    """Judge the samples against every partial-update state; fill ``report.candidates``.

    Returns the diagnosis for the first state the samples match within tolerance, or, with ``closer_than``,
    for the closest state whose mean |Δ| is below ``closer_than`` (a coarse cell, where W1 itself passes).
    """
    best: tuple[float, str] | None = None
    for state, how in _partial_states(check.new, check.old):
        judged = check.judge(check.trainer.reference(state))
        assert judged is not None
        distance = judged.residual.mean_abs
        report.candidates[how] = distance
        if closer_than is None and judged.passed:
            return f"partial update: the engine matches W1 with {how} (mean |Δ| {distance:.3g}): that tensor did not reach the engine"
        if closer_than is not None and distance < closer_than and (best is None or distance < best[0]):
            best = (distance, how)
    if best is None:
        return None
    return (
        f"partial update: the engine is closer to W1 with {best[1]} (mean |Δ| {best[0]:.3g}) than to W1 itself "
        f"(mean |Δ| {report.distance_new:.3g}), though W1 is within this cell's tolerance: that tensor did not reach "
        f"the engine"
    )


COARSE_MEAN_ABS = 1e-3
"""Cells whose mean-|Δ| tolerance is at least this (bf16) cannot see a one-tensor omission in the W1 check
alone, so :func:`judge_update` always scans the partial-update states there."""

CLOSER_FACTOR = 0.5
"""In a coarse cell, a partial-update state at most this fraction of the distance to W1 fails the update."""
