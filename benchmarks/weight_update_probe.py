"""Probe the weight-update paths of the installed vLLM (groundwork for the weight-update tier).

Starts one engine on the bundled model, makes W1 from W0 with seeded noise on a few tensors (a trainer
stand-in), pushes W1 through each path, and measures mean |Δ| of greedy decode logprobs against fp32 HF
references under W0 and under W1, with and without ``reset_prefix_cache()`` for a prompt cached under W0.

    .venv/bin/python benchmarks/weight_update_probe.py [--cell fp32-processed] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conformance.contract import SamplingSpec
    from conformance.engines.base import EngineFailure, Request
    from conformance.matrix import load_matrix, select_cells
    from conformance.models import BUNDLED_MODEL
    from conformance.plugin import DEFAULT_MATRIX, DEFAULT_PROMPTS
    from conformance.reference import HFReference
    from conformance.runner import EngineHandle, PromptSet

    parser = argparse.ArgumentParser()
    parser.add_argument("--cell", default="fp32-processed")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    cell = select_cells(load_matrix(DEFAULT_MATRIX), [args.cell], "matrix")[0]
    tokenizer = AutoTokenizer.from_pretrained(BUNDLED_MODEL)
    prompts = PromptSet.load(DEFAULT_PROMPTS, tokenizer)
    ref0 = HFReference(BUNDLED_MODEL)
    # Trainer stand-in: seeded noise on a few tensors, W0 -> W1 (fp32 HF model as the trainer holds it).
    model1 = AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1234)
    names = ["model.layers.1.mlp.down_proj.weight", "model.layers.3.self_attn.o_proj.weight", "lm_head.weight"]
    state = dict(model1.named_parameters())
    with torch.no_grad():
        for name in names:
            p = state[name]
            p.add_(torch.randn(p.shape, generator=gen) * 0.3 * p.std())
    ref1 = HFReference.__new__(HFReference)
    ref1.model, ref1.device, ref1.model_path, ref1.max_batch_tokens = model1.eval(), "cpu", BUNDLED_MODEL, 16384
    ref1.vocab_size = ref0.vocab_size
    w1 = [(n, state[n].detach().clone()) for n in names]
    w0 = [(n, dict(AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL, dtype=torch.float32).named_parameters())[n].detach().clone()) for n in names]

    spec = SamplingSpec(temperature=0.0, max_tokens=16, logprobs=1)
    long_prompt = tuple(t for i in (8, 9, 10) for t in prompts.ids[i][(0 if i == 8 else 1):])[:320]
    requests = [Request(long_prompt, spec), Request(prompts.ids[0], spec), Request(prompts.ids[12], spec)]

    def distances(samples) -> dict[str, float]:
        seqs = [(s.prompt_ids, s.output_ids) for g in samples for s in g]
        out = {}
        for label, ref in (("W0", ref0), ("W1", ref1)):
            logits = ref.raw_logits(seqs)
            deltas = []
            for (p, o), lg, g in zip(seqs, logits, [s for g in samples for s in g]):
                lp = lg.log_softmax(-1)
                deltas += [abs(float(lp[i, t]) - v) for i, (t, v) in enumerate(zip(o, g.sampled_values))]
            out[label] = float(np.mean(deltas))
        return out

    results = {}
    handle = EngineHandle(cell, BUNDLED_MODEL)
    llm = handle.engine.llm
    paths = {
        "reload_weights": lambda w: llm.collective_rpc(lambda self: self.reload_weights(weights_iterator=iter(w))),
        "model.load_weights": lambda w: llm.collective_rpc(lambda self: self.model_runner.model.load_weights(w)),
    }
    for path, push in paths.items():
        for reset in (False, True):
            key = f"{path}, {'reset' if reset else 'no reset'}"
            try:
                handle.engine.reset_prefix_cache()
                handle.engine.generate(requests)  # cache the prompts under W0
                push(w1)
                if reset:
                    handle.engine.reset_prefix_cache()
                results[key] = distances(handle.engine.generate(requests))
                push(w0)
                handle.engine.reset_prefix_cache()
                results[key]["after restoring W0"] = distances(handle.engine.generate(requests))["W0"]
            except (EngineFailure, Exception) as exc:  # noqa: BLE001 - a path the engine lacks is a result
                results[key] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
                if getattr(handle.engine, "dead", False):
                    handle.close()
                    handle = EngineHandle(cell, BUNDLED_MODEL)
                    llm = handle.engine.llm
            print(key, results[key], flush=True)
    handle.close()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
