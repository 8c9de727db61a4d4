"""Weight-sync faults under tensor parallelism, judged by the kit's update verdict: what the logprobs see and
what the per-rank read-back sees (the data behind docs/parallel.md's partial-shard table).

For each TP=2 cell (``--dtypes``: fp32-processed-tp2, and the same cell in bf16), the trainer stand-in
makes W1 from W0, and four pushes are judged against W1 with :func:`~conformance.weights.verdict.judge_update`:
a clean push; a push that returns early on TP rank 1 (rank 1 keeps W0); a push that leaves
``model.layers.1.mlp.down_proj.weight`` out on rank 1; and a push that leaves ``q_proj`` of layer 2 out on
rank 1 (a fused parameter, half loaded). Each row gives the logprob check against W1 alone (mean |Δ| of the
sampled-token residuals and whether it passes the cell's tolerance), the distance to W0, the verdict the kit
gives without the engine (logprobs and the modelled partial states only: what it could say before the per-rank
read-back), every rank's read-back status, and the verdict. W0 is restored and checked per rank after each
push; an engine that cannot be restored is noted and restarted.

With ``--pair``: the suite's TP=1 vs TP=2 execution-mode comparison (fp32-processed vs fp32-processed-tp2,
conformance/suite/test_execution_modes.py: same requests, same bound) on the clean engines, and after TP rank 1
alone took W1's ``model.layers.1.mlp.down_proj.weight``.

    .venv/bin/python benchmarks/tp_weight_sync.py [--dtypes float32,bfloat16] [--pair] [--md OUT]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Any


def planted_push(
    engine: Any,
    items: list[tuple[str, Any]],
    skip_tp_rank: int | None = None,
    drop_on_tp_rank: int | None = None,
    drop: str = "",
) -> list[Any]:
    """worker.reload_weights in every worker, except that TP rank ``skip_tp_rank`` returns early and TP rank
    ``drop_on_tp_rank`` gets every tensor but ``drop``."""

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


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from conformance.bundled import CPU_MATRIX
    from conformance.engines.base import PrefixCacheReset
    from conformance.judge import token_contexts
    from conformance.matrix import load_matrix
    from conformance.session import ParitySession
    from conformance.weights.paths import UPDATE_PATHS, default_probes, recommended_update, training_batch
    from conformance.weights.state import TrainerStandIn
    from conformance.weights.verdict import UpdateCheck, judge_update

    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--dtypes", default="float32", help="comma-separated dtypes of the TP=2 cell (float32, bfloat16)"
    )
    parser.add_argument(
        "--pair", action="store_true", help="also the TP=1 vs TP=2 comparison, clean and with a fault in rank 1"
    )
    parser.add_argument("--md", type=Path, default=None)
    args = parser.parse_args()
    matrix = {c.id: c for c in load_matrix(CPU_MATRIX)}
    base = matrix["fp32-processed-tp2"]
    names = {"float32": "fp32-processed-tp2", "bfloat16": "bf16-processed-tp2"}
    cells = [dataclasses.replace(base, id=names[d], dtype=d) for d in args.dtypes.split(",") if d]
    session = ParitySession(device="cpu")
    model = session.model_path()
    prompts = session.prompts(model)
    trainer = TrainerStandIn(model)
    w0, w1 = trainer.w0, trainer.step(training_batch(prompts.ids))
    ref0, ref1 = trainer.reference(w0), trainer.reference(w1)
    probes = default_probes(prompts.ids)
    reload = UPDATE_PATHS["reload-iterator"]
    pushes: dict[str, dict[str, Any]] = {
        "clean push (reload_weights, both ranks)": {},
        "TP rank 1 returns early": {"skip_tp_rank": 1},
        "model.layers.1.mlp.down_proj.weight left out on TP rank 1": {
            "drop_on_tp_rank": 1,
            "drop": "model.layers.1.mlp.down_proj.weight",
        },
        "model.layers.2.self_attn.q_proj.weight left out on TP rank 1 (fused qkv_proj)": {
            "drop_on_tp_rank": 1,
            "drop": "model.layers.2.self_attn.q_proj.weight",
        },
    }
    rows = []

    def judge(engine: Any, cell: Any, new: Any, ref_new: Any, blind: bool = False) -> Any:
        engine.reset_prefix_cache()
        samples = engine.generate(list(probes.requests))
        check = UpdateCheck(
            probes.requests,
            samples,
            token_contexts(engine, probes.requests),
            trainer,
            new,
            w0,
            cell.logprobs_mode,
            cell.tolerance,
            cell.id,
            "planted push",
            new_reference=ref_new,
            old_reference=ref0,
            engine=engine,
        )
        if not blind:
            return judge_update(check), None
        return judge_update(check), judge_update(dataclasses.replace(check, engine=None))

    pair_lines: list[str] = []
    if args.pair:
        from conformance.path_comparison import compare_samples
        from conformance.suite.test_execution_modes import pair_requests, pair_tolerance

        requests = pair_requests(prompts.ids)
        tp1_handle, tp2_handle = session.handle(matrix["fp32-processed"]), session.handle(base)
        try:
            tp1, tp2 = tp1_handle.engine, tp2_handle.engine
            tolerance = pair_tolerance(tp1_handle.cell, tp2_handle.cell)
            tp1.generate(requests)
            first = tp1.generate(requests)

            def against_tp1(label: str) -> None:
                assert isinstance(tp2, PrefixCacheReset), f"{tp2.description}: no prefix cache to reset"
                tp2.reset_prefix_cache()
                tp2.generate(requests)
                second = tp2.generate(requests)
                comps = [
                    compare_samples(a, b, "fp32-processed", ("fp32-processed", base.id), tolerance, f"prompt {i}")
                    for i, (a, b) in enumerate(zip(first, second))
                ]
                worst = max(c.max_abs for c in comps)
                diverged = sum(len(c.divergences) for c in comps)
                pair_lines.append(
                    f"| {label} | {sum(c.compared for c in comps)} | {worst:.2g} | {tolerance:g} | {diverged} | "
                    f"{'passes' if all(c.passed for c in comps) else 'FAILS'} |"
                )
                print(pair_lines[-1], flush=True)

            against_tp1("clean engines (both at W0)")
            planted_push(tp2, w0.with_tensor_from(w1, "model.layers.1.mlp.down_proj.weight").items(), skip_tp_rank=0)
            against_tp1("TP rank 1 alone holds W1's layers.1.mlp.down_proj")
        finally:
            tp1_handle.close()
            tp2_handle.close()

    for cell in cells:
        handle = session.handle(cell)
        try:
            started = time.perf_counter()
            engine = handle.engine
            print(f"{cell.id}: started in {time.perf_counter() - started:.0f} s", flush=True)
            for name, kwargs in pushes.items():
                planted_push(engine, w1.items(), **kwargs)
                report, blind = judge(engine, cell, w1, ref1, blind=True)
                shards = report.shards
                rows.append(
                    {
                        "cell": cell.id,
                        "push": name,
                        "to_w1": report.distance_new,
                        "to_w1_passed": report.to_new.passed,
                        "tol": report.to_new.tolerance.mean_abs,
                        "to_w0": report.distance_old,
                        "blind": "passed" if blind.passed else f"FAILED: {blind.diagnosis[:90]}",
                        "ranks": "; ".join(
                            f"tp {r.tp_rank}: {r.status}"
                            + (f" ({', '.join(n for n, _ in r.off[:2])})" if r.status == "PARTIAL" else "")
                            for r in (shards.ranks if shards else [])
                        ),
                        "readback_s": shards.seconds if shards else float("nan"),
                        "verdict": "passed" if report.passed else f"FAILED [{report.layer}]",
                    }
                )
                print(rows[-1], flush=True)
                with tempfile.TemporaryDirectory() as tmp:
                    recommended_update(engine, reload, w0, Path(tmp))
                restored, _ = judge(engine, cell, w0, ref0)
                if not (restored.to_new.passed and restored.shards is not None and restored.shards.passed):
                    rows[-1]["after"] = (
                        f"W0 pushed back, every rank's shards verified {'at W0' if restored.shards and restored.shards.passed else 'NOT at W0'}, "
                        f"yet logprobs {'fail' if not restored.to_new.passed else 'pass'}: {restored.to_new.reasons[0][:80]}; engine restarted"
                    )
                    print(rows[-1]["after"], flush=True)
                    handle.close()
                    engine = handle.engine
        finally:
            handle.close()
    lines = [
        (
            "| cell | push | logprobs vs W1: mean \\|Δ\\| (tolerance) | logprob check alone | mean \\|Δ\\| to W0 | "
            "verdict without the read-back | per-rank read-back | verdict |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['cell']} | {r['push']} | {r['to_w1']:.2g} ({r['tol']:g}) | {'passes' if r['to_w1_passed'] else 'fails'} | "
            f"{r['to_w0']:.2g} | {r['blind']} | {r['ranks']} | {r['verdict']} |"
        )
    lines += [f"\n{r['cell']}, {r['push']}: {r['after']}" for r in rows if r.get("after")]
    if pair_lines:
        lines += [
            "",
            "| TP=1 vs TP=2 (execution-mode pair) | values compared | max \\|Δ\\| | bound | tokens diverged | comparison |",
            "|---|---|---|---|---|---|",
            *pair_lines,
        ]
    table = "\n".join(lines)
    print(table)
    if args.md:
        args.md.write_text(table + "\n")


if __name__ == "__main__":
    main()
