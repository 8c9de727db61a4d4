#!/usr/bin/env python3
"""Finding vllm-0.26-triton-topp-sharp-rows: standalone reproduction (torch, vllm, transformers, stdlib).

vLLM 0.26.0's Triton top-k/top-p kernel (``vllm/v1/sample/ops/topk_topp_triton.py``), standalone top-p
branch, normalises with ``max_sample = avg_logit + 10 * std_logit`` computed over the first block of the row
(lines 598-620) instead of the row's maximum, and sums ``exp(logit - max_sample)`` (636-640). For a sharp
row (logits divided by a low temperature) ``max_sample`` lies far above the largest logit, every term
underflows, ``sum_exp_logits`` is 0, the final pivot ``log(p_pivot * sum_exp_logits) + max_sample`` (824) is
-inf or NaN and the mask pass is skipped (830-832): top-p is not applied at all. The dispatcher
``apply_top_k_top_p`` sends batches of 8 rows or more to this kernel on CUDA (topk_topp_sampler.py:356).

(a) kernel: rows of N(0, 3.2^2) logits (the bundled model's raw logit spread) divided by T, top_p = 0.5,
    vLLM's dispatcher against its PyTorch path, at 1, 8 and 64 rows: tokens the dispatcher keeps outside
    the nucleus with a probability fp32 holds, and the largest such probability.
(b) end to end: ``vllm.LLM`` (fp32, eager, processed_logprobs) on the bundled model, 8 prompts at T = 0.1,
    top_p = 0.5, logprobs = 5: the same requests one by one (PyTorch path) and as one batch of 8 (Triton):
    how many top-5 entries are finite at the first position, and how many sampled tokens carry a
    processed logprob below 0 over 16 tokens (with a nucleus of one token every value is 0.0).

    python docs/findings/vllm-0.26-triton-topp-sharp-rows.py [MODEL] [--skip-e2e]

Exit code 0 whatever the outcome; the last line says "FINDING REPRODUCED: ..." or "not reproduced: ...".
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO / "conformance" / "fixtures" / "models" / "pystdlib-llama"
PROMPTS = REPO / "conformance" / "fixtures" / "prompts" / "default.json"


def kernel() -> int:
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p, apply_top_k_top_p_pytorch

    torch.manual_seed(0)
    print("(a) kernel: vLLM's apply_top_k_top_p vs apply_top_k_top_p_pytorch, 2048 logits ~ N(0, 3.2^2) / T, top_p 0.5")
    print("| T | rows | rows differing | kept outside the nucleus (prob > 0) | largest such prob |")
    print("|---|---|---|---|---|")
    bad = 0
    for temperature in (1.0, 0.5, 0.3, 0.2, 0.1, 0.05):
        for batch in (1, 8, 64):
            logits = torch.randn(batch, 2048, device="cuda") * 3.2 / temperature
            p = torch.full((batch,), 0.5, device="cuda")
            ref = torch.isfinite(apply_top_k_top_p_pytorch(logits.clone(), None, p))
            got = torch.isfinite(apply_top_k_top_p(logits.clone(), None, p))
            probs = logits.softmax(-1)
            extra = got & ~ref & (probs > 0)
            largest = float(probs[extra].max()) if bool(extra.any()) else 0.0
            differ = int((got != ref).any(-1).sum())
            bad += int(extra.sum()) if batch >= 8 else 0
            print(f"| {temperature} | {batch} | {differ} | {int(extra.sum())} | {largest:.3g} |")
    return bad


def end_to_end(model: str) -> tuple[int, int]:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tok = AutoTokenizer.from_pretrained(model)
    texts = json.loads(PROMPTS.read_text())[:8] if PROMPTS.is_file() else [f"def f{i}(x):" for i in range(8)]
    prompts = [{"prompt_token_ids": [tok.bos_token_id, *tok.encode(t, add_special_tokens=False)]} for t in texts]
    llm = LLM(
        model=model,
        dtype="float32",
        enforce_eager=True,
        max_model_len=1024,
        logprobs_mode="processed_logprobs",
        gpu_memory_utilization=0.1,
        kv_cache_memory_bytes=1 << 30,
        max_logprobs=-1,
    )

    def params(i: int, tokens: int) -> SamplingParams:
        return SamplingParams(temperature=0.1, top_p=0.5, max_tokens=tokens, logprobs=5, seed=i, ignore_eos=True)

    print("\n(b) end to end: T=0.1, top_p=0.5, logprobs=5 (processed_logprobs, fp32)")
    print("| prompt | one by one: finite top-5 at pos 0 | batch of 8: finite top-5 at pos 0 (values) |")
    print("|---|---|---|")
    alone = [llm.generate([prompts[i]], params(i, 1), use_tqdm=False)[0] for i in range(8)]
    batch = llm.generate(prompts, [params(i, 1) for i in range(8)], use_tqdm=False)
    extra_entries = 0
    for i in range(8):
        a = [v.logprob for v in alone[i].outputs[0].logprobs[0].values() if v.logprob > float("-inf")]
        b = sorted(
            (v.logprob for v in batch[i].outputs[0].logprobs[0].values() if v.logprob > float("-inf")), reverse=True
        )
        extra_entries += max(0, len(b) - len(a))
        print(f"| {i} | {len(a)} | {len(b)} ({', '.join(f'{x:.3g}' for x in b)}) |")
    long_alone = [llm.generate([prompts[i]], params(i, 16), use_tqdm=False)[0] for i in range(8)]
    long_batch = llm.generate(prompts, [params(i, 16) for i in range(8)], use_tqdm=False)

    def below_zero(outs: list[Any]) -> tuple[int, int]:
        values = [
            step[token].logprob
            for out in outs
            for token, step in zip(out.outputs[0].token_ids, out.outputs[0].logprobs, strict=False)
        ]
        return sum(1 for v in values if v < -1e-3), len(values)

    na, ta = below_zero(long_alone)
    nb, tb = below_zero(long_batch)
    print(
        f"sampled tokens with processed logprob < 0 (outside a one-token nucleus): one by one {na}/{ta}, batch of 8 {nb}/{tb}"
    )
    return extra_entries, nb


def main() -> None:
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    model = args[0] if args else str(DEFAULT_MODEL)
    import vllm

    print(f"vllm {vllm.__version__} torch {torch.__version__} device {torch.cuda.get_device_name(0)}")
    bad = kernel()
    extra, sampled = (0, 0) if "--skip-e2e" in sys.argv else end_to_end(model)
    if bad or extra or sampled:
        print(
            f"FINDING REPRODUCED: the dispatcher keeps {bad} tokens of nonzero probability outside the nucleus at 8+ rows; "
            f"end to end {extra} extra finite top-5 entries and {sampled} sampled tokens outside a one-token nucleus in the batch of 8"
        )
    else:
        print("not reproduced: top-p kept the same tokens on both paths")


if __name__ == "__main__":
    main()
