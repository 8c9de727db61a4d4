#!/usr/bin/env python3
"""Finding vllm-0.26-v1-runner-allowed-token-ids-swap: standalone reproduction (torch, vllm, transformers, stdlib).

vLLM 0.26.0's V1 model runner keeps per-request sampling state in ``InputBatch``
(``vllm/v1/worker/gpu_input_batch.py``). ``swap_states(i1, i2)``, which the attention backends call to put
decode requests before prefills (``reorder_batch_to_split_decodes_and_prefills``,
``vllm/v1/attention/backends/utils.py:736``), swaps two rows of the boolean ``allowed_token_ids`` mask with a
tuple assignment of row *views* (gpu_input_batch.py:672-678)::

    (mask[i1], mask[i2]) = (mask[i2], mask[i1])

The first assignment copies row i2 into row i1; the second copies row i1 (now i2's data) back into row i2.
Both rows end up with i2's mask: a request is restricted to another request's ``allowed_token_ids`` (or
loses its own). vLLM 0.32 swaps with index lists (``mask[[i1, i2]] = mask[[i2, i1]]``). The default V2 model
runner does not use ``InputBatch``.

(a) the swap on a plain tensor (CPU): rows before and after, and with vLLM 0.32's index-list swap;
(b) end to end, once per model runner (VLLM_USE_V2_MODEL_RUNNER = 0 and 1, each in its own process): the
    batch on which the parity suite failed (greedy requests, one of them with allowed_token_ids, prompts of
    very different lengths, so decodes and prefills share steps), every plain request also run alone; a
    plain request whose batch output differs from its output alone with tokens from the other request's
    allowed set is the finding.

    python docs/findings/vllm-0.26-v1-runner-allowed-token-ids-swap.py [MODEL]

Exit code 0 whatever the outcome; the last line says "FINDING REPRODUCED: ..." or "not reproduced: ...".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO / "conformance" / "fixtures" / "models" / "pystdlib-llama"
PROMPTS = REPO / "conformance" / "fixtures" / "prompts" / "default.json"
ALLOWED = [0, 15, 35, 299, 366, 376, 387, 409, 592, 707, 709, 805, 911, 918, 1227, 1603, 1679, 1943]


def tensor_swap() -> bool:
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[1] = True
    mask[1][[2, 3]] = False  # row 1: a request allowed only tokens 2 and 3 (True = filled with -inf)
    before = mask.clone()
    (mask[0], mask[1]) = (mask[1], mask[0])  # vLLM 0.26, gpu_input_batch.py:672-678
    fixed = before.clone()
    fixed[[0, 1]] = fixed[[1, 0]]  # vLLM 0.32
    print("(a) rows of the allowed_token_ids mask (True = token masked)")
    print(f"    before:              {before.int().tolist()}")
    print(f"    0.26 tuple swap:     {mask.int().tolist()}   <- both rows hold row 1's mask")
    print(f"    0.32 index swap:     {fixed.int().tolist()}")
    return bool(torch.equal(mask[0], mask[1]))


def child(model: str) -> None:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tok = AutoTokenizer.from_pretrained(model)
    texts = json.loads(PROMPTS.read_text())
    ids = [[tok.bos_token_id, *tok.encode(t, add_special_tokens=False)] for t in texts]
    llm = LLM(
        model=model,
        dtype="float32",
        enforce_eager=True,
        max_model_len=1024,
        logprobs_mode="processed_logprobs",
        gpu_memory_utilization=0.1,
        kv_cache_memory_bytes=1 << 30,
    )
    masked = SamplingParams(
        temperature=0.0,
        repetition_penalty=0.5,
        logit_bias={884: -6.277487396354248, 0: 0.075},
        allowed_token_ids=ALLOWED,
        bad_words=["le", "so", "ype"],
        max_tokens=1,
    )
    penalised = SamplingParams(
        temperature=0.0,
        frequency_penalty=-0.3505440728656065,
        presence_penalty=0.9312647353040355,
        logit_bias={576: 4.730574479253351},
        min_tokens=17,
        max_tokens=24,
    )
    plain = SamplingParams(temperature=0.0, max_tokens=24)
    requests = (
        [(i, masked) for i in (14, 12, 12, 0, 12, 0)] + [(i, penalised) for i in (0, 2)] + [(i, plain) for i in (1, 0)]
    )
    free = [k for k, (_, p) in enumerate(requests) if p.allowed_token_ids is None]
    alone = {
        k: list(
            llm.generate([{"prompt_token_ids": ids[requests[k][0]][:1000]}], requests[k][1], use_tqdm=False)[0]
            .outputs[0]
            .token_ids
        )
        for k in free
    }
    leaked = differ = 0
    for trial, order in enumerate((list(range(10)), list(range(9, -1, -1)), [8, 0, 9, 1, 6, 2, 7, 3, 4, 5])):
        outs = llm.generate(
            [{"prompt_token_ids": ids[requests[k][0]][:1000]} for k in order],
            [requests[k][1] for k in order],
            use_tqdm=False,
        )
        for k, out in zip(order, outs, strict=True):
            if k not in free:
                continue
            got = list(out.outputs[0].token_ids)
            if got != alone[k]:
                differ += 1
                first = next(i for i, (a, b) in enumerate(zip(got, alone[k], strict=False)) if a != b)
                inside = got[first] in ALLOWED
                leaked += inside
                print(
                    f"    trial {trial} request {k} (prompt {requests[k][0]}): batch {got[first]} vs alone {alone[k][first]} at position {first}; batch token in the other request's allowed set: {inside}"
                )
    print(f"RESULT {json.dumps({'differ': differ, 'leaked': leaked})}")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2])
        return
    model = sys.argv[1] if len(sys.argv) > 1 else str(DEFAULT_MODEL)
    swapped = tensor_swap()
    import vllm

    print(f"vllm {vllm.__version__} torch {torch.__version__}")
    results = {}
    for runner in ("0", "1"):
        env = {**os.environ, "VLLM_USE_V2_MODEL_RUNNER": runner, "VLLM_USE_FLASHINFER_SAMPLER": "0"}
        print(f"(b) VLLM_USE_V2_MODEL_RUNNER={runner}")
        proc = subprocess.run(
            [sys.executable, __file__, "--child", model],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith(("    trial", "RESULT"))]
        print("\n".join(lines) or proc.stderr[-2000:])
        result = next((json.loads(line[7:]) for line in lines if line.startswith("RESULT")), None)
        results[runner] = result
    v1, v2 = results.get("0") or {}, results.get("1") or {}
    if swapped and v1.get("leaked", 0) > 0 and not v2.get("leaked", 0):
        print(
            f"FINDING REPRODUCED: V1 runner: {v1['leaked']} plain greedy requests took tokens of another request's allowed set ({v1['differ']} differ from alone); V2 runner: {v2.get('differ')} differ"
        )
    else:
        print(f"not reproduced end to end: V1 {v1}, V2 {v2} (the tensor swap alone shows the mechanism: {swapped})")


if __name__ == "__main__":
    main()
