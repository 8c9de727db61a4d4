"""Weight-update tier: weights pushed into a running engine reach the model, the cache and the head.

Each test pushes W1 (the trainer stand-in's step, :class:`conformance.weights.TrainerStandIn`) into the
cell's running engine through one path and judges greedy probes against fp32 references under W1 (must
match within the cell tolerance) and W0 (must be measurably far). Probes are first run under W0 so the
prefix cache holds W0's KV. Every test leaves the engine at W0 again (verified), so the other families can
share the engine; if that fails the engine is restarted.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conformance.checks import engine_failure_message, known_finding_for
from conformance.engines.base import EngineFailure
from conformance.weights import (
    UPDATE_PATHS,
    ProbeSet,
    TrainerStandIn,
    UpdateReport,
    WeightSet,
    default_path,
    default_probes,
    head_dtype,
    judge_update,
    path_unavailable,
    recommended_update,
    training_batch,
)

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
def update_kits(parity_config: Any) -> Any:
    """``get(model_path, prompt_ids)`` -> the :class:`UpdateKit` of that model (built once per model)."""
    kits: dict[Path, UpdateKit] = {}

    def get(model_path: Path, prompt_ids: Any) -> UpdateKit:
        if model_path not in kits:
            trainer = TrainerStandIn(model_path, device=parity_config.device)
            w1 = trainer.step(training_batch(prompt_ids))
            kits[model_path] = UpdateKit(
                trainer, trainer.w0, w1, trainer.reference(trainer.w0), trainer.reference(w1), default_probes(prompt_ids)
            )
        return kits[model_path]

    return get


@pytest.fixture
def kit(update_kits: Any, parity_model_path: Path, parity_runner: Any) -> UpdateKit:
    return update_kits(parity_model_path, parity_runner.prompts.ids)


def _judge(runner: Any, kit: UpdateKit, samples: Any, new: WeightSet, ref_new: Any, path: str) -> UpdateReport:
    engine = runner.handle.engine
    contexts = [engine.token_context(r) for r in kit.probes.requests]
    return judge_update(
        kit.probes.requests, samples, contexts, kit.trainer, new, kit.w0, runner.cell.logprobs_mode,
        runner.cell.tolerance, runner.cell.id, path, new_reference=ref_new, old_reference=kit.ref0, engine=engine,
    )


def _generate(runner: Any, kit: UpdateKit, test: str) -> Any:
    try:
        return runner.generate(list(kit.probes.requests))
    except EngineFailure as exc:
        record = runner.engine_failure("weight-update probes (3 greedy prompts, 16 tokens)", exc, test)
        pytest.fail(engine_failure_message(record), pytrace=False)


def _push(runner: Any, path_name: str | None, weights: WeightSet, test: str) -> None:
    """The recommended update sequence (``path_name`` None: the engine's default path); an engine failure
    is a finding (xfail when known)."""
    try:
        engine = runner.handle.engine
        path = UPDATE_PATHS[path_name] if path_name else default_path(engine)
        path_name = path.name
        recommended_update(engine, path, weights)
    except EngineFailure as exc:
        finding = known_finding_for(runner, exc)
        repro = f"push {weights.label} ({len(weights.tensors)} tensors) via {path_name}"
        record = runner.engine_failure(repro, exc, test, known=finding.id if finding else None)
        if finding is not None:
            pytest.xfail(f"known engine finding {finding.id}: {finding.summary}; reproduce: {repro}")
        pytest.fail(engine_failure_message(record), pytrace=False)


@pytest.fixture
def restores_w0(parity_runner: Any, kit: UpdateKit) -> Iterator[None]:
    """After the test: W0 back in the engine and verified; the engine is restarted if that fails."""
    yield
    handle = parity_runner.handle
    try:
        recommended_update(handle.engine, default_path(handle.engine), kit.w0)
        samples = parity_runner.generate(list(kit.probes.requests))
        report = _judge(parity_runner, kit, samples, kit.w0, kit.ref0, "restore W0")
        restored = report.to_new.passed
        detail = report.explain()
    except EngineFailure as exc:
        restored, detail = False, str(exc)
    if not restored:
        handle.close()
        pytest.fail(f"could not restore W0 after the test (engine restarted for the next tests):\n{detail}", pytrace=False)


@pytest.mark.parametrize("path_name", list(UPDATE_PATHS))
def test_update_reaches_engine(
    cell: Any, parity_runner: Any, kit: UpdateKit, restores_w0: None, path_name: str, request: pytest.FixtureRequest
) -> None:
    """Probes cached under W0, W1 pushed (then the prefix cache reset), probes again: W1 within tolerance,
    W0 measurably far."""
    path = UPDATE_PATHS[path_name]
    reason = path_unavailable(path, parity_runner.handle.engine)
    if reason:
        pytest.skip(reason)
    test = request.node.nodeid
    parity_runner.handle.engine.reset_prefix_cache()
    _generate(parity_runner, kit, test)  # fills the prefix cache under W0
    _push(parity_runner, path_name, kit.w1, test)
    report = _judge(parity_runner, kit, _generate(parity_runner, kit, test), kit.w1, kit.ref1, path_name)
    if parity_runner.recorder is not None:
        parity_runner.recorder.add(test, report.to_new)
    assert report.passed, report.explain()


def test_head_reflects_update(cell: Any, parity_runner: Any, kit: UpdateKit, restores_w0: None, request: pytest.FixtureRequest) -> None:
    """A cell with a configured head dtype keeps it across an update, and the head serves W1's lm_head:
    W1 with only lm_head at W0 is measurably far from what the engine returns."""
    if cell.head_dtype is None:
        pytest.skip(f"cell {cell.id} configures no head_dtype (the lm_head follows dtype={cell.dtype})")
    test = request.node.nodeid
    if "lm_head.weight" not in kit.w1.changed_from(kit.w0):
        pytest.skip("the model has no separate lm_head.weight (tied embeddings)")
    before = head_dtype(parity_runner.handle.engine)
    _push(parity_runner, None, kit.w1, test)
    dtype = head_dtype(parity_runner.handle.engine)
    assert before == dtype == cell.head_dtype, (
        f"cell {cell.id}: the lm_head projection runs in {before} before and {dtype} after the update; "
        f"configured {cell.head_dtype}"
    )
    samples = _generate(parity_runner, kit, test)
    report = _judge(parity_runner, kit, samples, kit.w1, kit.ref1, "default path")
    assert report.passed, report.explain()
    stale_head = kit.w1.with_tensor_from(kit.w0, "lm_head.weight")
    head_report = _judge(parity_runner, kit, samples, stale_head, kit.trainer.reference(stale_head), "default path")
    assert head_report.distance_new >= report.required_separation, (
        f"cell {cell.id}: after the update the engine is as close to W1-with-lm_head-at-W0 "
        f"(mean |Δ| {head_report.distance_new:.3g}) as required separation {report.required_separation:.3g}: "
        f"the head did not take W1 (distance to W1 {report.distance_new:.3g})"
    )


def test_refits_stay_flat(cell: Any, parity_runner: Any, kit: UpdateKit, restores_w0: None, request: pytest.FixtureRequest) -> None:
    """Pushing unchanged weights again and again (with the recommended reset) changes nothing: every refit
    passes against W0, returns the same tokens, and its values stay within the cell's tolerance of the first
    run's (max |Δ| and mean Δ), so nothing accumulates."""
    test = request.node.nodeid
    engine = parity_runner.handle.engine
    engine.reset_prefix_cache()
    first = _generate(parity_runner, kit, test)
    tol = cell.tolerance
    drift: list[tuple[float, float]] = []
    for refit in range(1, REFITS + 1):
        _push(parity_runner, None, kit.w0, test)
        samples = _generate(parity_runner, kit, test)
        report = _judge(parity_runner, kit, samples, kit.w0, kit.ref0, "refit")
        assert report.to_new.passed, f"refit {refit}:\n" + report.to_new.explain()
        deltas: list[float] = []
        for a_group, b_group in zip(first, samples):
            for a, b in zip(a_group, b_group):
                assert a.output_ids == b.output_ids, f"refit {refit}: greedy tokens changed ({a.output_ids} -> {b.output_ids})"
                deltas += [y - x for x, y in zip(a.sampled_values, b.sampled_values) if x is not None and y is not None]
        worst = max((abs(d) for d in deltas), default=0.0)
        mean = sum(deltas) / len(deltas) if deltas else 0.0
        drift.append((worst, mean))
        assert worst <= tol.max_abs and abs(mean) <= tol.bias, (
            f"cell {cell.id}: refit {refit} of unchanged weights moved the values: max |Δ| {worst:.3g} "
            f"(tolerance {tol.max_abs:g}), mean Δ {mean:+.3g} (tolerance {tol.bias:g}); per refit so far: "
            + ", ".join(f"{w:.2g}/{m:+.2g}" for w, m in drift)
        )
