"""Measure every weight-update path of the installed vLLM on real engines (the data behind the tier).

Per cell: a trainer stand-in makes W1 from W0 (one AdamW step on four prompts, then seeded noise on three
tensors); for each update path, the probe requests are first run under W0 (filling the prefix cache), W1 is
pushed, optionally the prefix cache is reset, and the same requests are judged against fp32 references under
W1 and W0 (mean |Δ| = mean distance of the returned sampled-token values from their legitimate range).
Then: a partial push (one tensor left out), five refits of unchanged weights, and the lm_head dtype after an
update. Each measurement restores W0 afterwards.

    .venv/bin/python benchmarks/weight_update_probe.py [--cells fp32-processed,bf16-processed] [--json OUT] [--md OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from conformance.bundled import CPU_MATRIX as DEFAULT_MATRIX
    from conformance.engines.base import EngineFailure, PrefixCacheReset
    from conformance.engines.vllm_common import vllm_version
    from conformance.judge import token_contexts
    from conformance.matrix import load_matrix, select_cells
    from conformance.session import ParitySession
    from conformance.weights.paths import (
        UPDATE_PATHS,
        default_probes,
        head_dtype,
        path_unavailable,
        recommended_update,
        training_batch,
    )
    from conformance.weights.state import TrainerStandIn
    from conformance.weights.verdict import UpdateCheck, judge_update

    parser = argparse.ArgumentParser()
    parser.add_argument("--cells", default="fp32-processed,bf16-processed,bf16-processed-head32,fp32-processed-nocache")
    parser.add_argument("--matrix", type=Path, default=DEFAULT_MATRIX)
    parser.add_argument("--device", default="cpu", help="device of the trainer stand-in and its references")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--md", type=Path, default=None)
    args = parser.parse_args()
    cells = select_cells(load_matrix(args.matrix), args.cells.split(","), str(args.matrix))
    session = ParitySession(device=args.device)
    model = session.model_path()
    prompts = session.prompts(model)
    trainer = TrainerStandIn(model, device=args.device)
    w0 = trainer.w0
    w1 = trainer.step(training_batch(prompts.ids))
    ref0, ref1 = trainer.reference(w0), trainer.reference(w1)
    probes = default_probes(prompts.ids)
    rows: list[dict[str, Any]] = []

    for cell in cells:
        handle = session.handle(cell)
        try:
            engine = handle.engine
        except EngineFailure as exc:
            rows.append({"cell": cell.id, "measure": "engine start", "error": exc.reason[:300]})
            print(rows[-1], flush=True)
            continue
        contexts = token_contexts(engine, probes.requests)

        def measure(label: str, path_name: str, push: Any, reset: bool, new: Any, ref_new: Any = None) -> None:
            nonlocal engine
            start = time.perf_counter()
            try:
                assert isinstance(engine, PrefixCacheReset), f"{engine.description}: no prefix cache to reset"
                engine.reset_prefix_cache()
                engine.generate(list(probes.requests))  # cache the probes under W0
                push()
                if reset:
                    engine.reset_prefix_cache()
                samples = engine.generate(list(probes.requests))
                report = judge_update(
                    UpdateCheck(
                        probes.requests,
                        samples,
                        contexts,
                        trainer,
                        new,
                        w0,
                        cell.logprobs_mode,
                        cell.tolerance,
                        cell.id,
                        path_name,
                        new_reference=ref_new,
                        old_reference=ref0,
                        engine=engine,
                    )
                )
                row = {
                    "cell": cell.id,
                    "measure": label,
                    "path": path_name,
                    "reset": reset,
                    "to_W1": report.distance_new,
                    "to_W0": report.distance_old,
                    "passed": report.to_new.passed if new is w0 else report.passed,
                    "diagnosis": report.diagnosis,
                    "cached_sequences": report.cached_sequences,
                }
            except EngineFailure as exc:
                row = {"cell": cell.id, "measure": label, "path": path_name, "reset": reset, "error": exc.reason[:300]}
            finally:
                try:
                    recommended_update(engine, UPDATE_PATHS["reload-iterator"], w0)
                except EngineFailure:
                    handle.close()
                    engine = handle.engine
            row["seconds"] = round(time.perf_counter() - start, 2)
            rows.append(row)
            print(json.dumps(row), flush=True)

        for path in UPDATE_PATHS.values():
            reason = path_unavailable(path, engine)
            if reason:
                rows.append({"cell": cell.id, "measure": "update", "path": path.name, "skipped": reason})
                print(path.name, "skipped:", reason, flush=True)
                continue
            for reset in (False, True):
                measure(
                    "update", path.name, lambda p=path: p.push(engine, w1, Path("/tmp/parity-probe")), reset, w1, ref1
                )
        partials = [
            ("model.layers.1.mlp.down_proj.weight", "reload-iterator"),
            ("model.layers.2.self_attn.q_proj.weight", "reload-iterator"),
            ("model.layers.2.self_attn.q_proj.weight", "weight-transfer-host"),
            ("lm_head.weight", "reload-iterator"),
        ]
        for name, path_name in partials:
            if path_unavailable(UPDATE_PATHS[path_name], engine):
                continue
            partial = w1.without(name)
            measure(
                f"partial (without {name})",
                path_name,
                lambda p=partial, u=UPDATE_PATHS[path_name]: u.push(engine, p, Path("/tmp/parity-probe")),
                True,
                w1,
                ref1,
            )
        for i in range(5):
            measure(
                f"refit {i + 1} (W0 again)",
                "reload-iterator",
                lambda: UPDATE_PATHS["reload-iterator"].push(engine, w0, Path("/tmp")),
                True,
                w0,
                ref0,
            )
        try:
            UPDATE_PATHS["reload-iterator"].push(engine, w1, Path("/tmp"))
            rows.append({"cell": cell.id, "measure": "lm_head dtype after update", "value": head_dtype(engine)})
            recommended_update(engine, UPDATE_PATHS["reload-iterator"], w0)
            rows.append({"cell": cell.id, "measure": "lm_head dtype after restoring W0", "value": head_dtype(engine)})
        except EngineFailure as exc:
            rows.append({"cell": cell.id, "measure": "lm_head dtype", "error": exc.reason[:300]})
        print(rows[-1], flush=True)
        handle.close()

    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    table = [
        "| cell | measure | path | cache reset | mean abs Δ to W1 | to W0 | verdict | diagnosis / note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "to_W1" in r:
            verdict = "pass" if r["passed"] else "FAIL"
            if r["measure"].startswith("refit"):
                r = {**r, "diagnosis": "(judged against W0)"}
            table.append(
                f"| {r['cell']} | {r['measure']} | {r['path']} | {'yes' if r['reset'] else 'no'} | {r['to_W1']:.2g} | {r['to_W0']:.2g} | {verdict} | {r['diagnosis'][:320]} |"
            )
        else:
            note = r.get("skipped") or r.get("error") or r.get("value")
            table.append(
                f"| {r['cell']} | {r['measure']} | {r.get('path', '')} | | | | {'skip' if 'skipped' in r else ('error' if 'error' in r else '')} | {str(note)[:160]} |"
            )
    text = "\n".join(table)
    print(text)
    if args.md:
        header = HEADER.format(vllm=vllm_version(), device=args.device, matrix=args.matrix.name, cells=args.cells)
        args.md.write_text(header + "\n" + text + "\n")


HEADER = """# Weight-update tier: vLLM {vllm}, matrix {matrix}, references on {device}

Written by `benchmarks/weight_update_probe.py --cells {cells} --md ...`. Trainer stand-in: one AdamW step
(lr 1e-3) on four prompts, then seeded noise (0.3 std) on layer-1 down_proj, layer-3 o_proj and lm_head.
Probes: greedy, 16 tokens, a 320-token prompt (several KV blocks) and two short prompts, run under W0 first
(so the prefix cache holds W0's KV). Mean |Δ| = mean distance of the returned sampled-token values from their
legitimate range under the fp32 reference with W1 (pushed) or W0 (previous) weights. Verdict: W1 within the
cell tolerance and W0 at least 4 mean tolerances away; refit rows are judged against W0. Partial rows leave
one tensor out of the push; the diagnosis names it from the weight states the kit models or, when none
matches (a fused parameter left half-written), from the first module whose hidden states leave W1's.
"""


if __name__ == "__main__":
    main()
