"""Probe: does vLLM's Triton top-k/top-p kernel keep the same tokens as its PyTorch reference path?

Found by the parity suite on vLLM 0.26.0 (H200): with allowed_token_ids + min_p + top_p, the engine's
processed logprob of a sampled token was 0 (a lone survivor) where the V1 semantics (and the CPU engine)
keep two tokens. This script compares ``apply_top_k_top_p_triton`` with ``apply_top_k_top_p_pytorch``
on logits with many -inf entries (what allowed_token_ids and min_p leave) and prints a table.

    python benchmarks/gpu_topp_probe.py [--json OUT]
"""

from __future__ import annotations

import argparse
import json

import torch


def main() -> None:
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch
    from vllm.v1.sample.ops.topk_topp_triton import apply_top_k_top_p_triton

    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    vocab, batch = 2048, 256
    rows = []
    for finite in (vocab, 512, 32, 4):
        for min_p in (0.0, 0.3):
            for top_k in (None, 20):
                for top_p in (0.5, 0.76, 0.86, 0.95):
                    logits = torch.randn(batch, vocab, device="cuda") * 2.5
                    if finite < vocab:
                        keep = torch.rand(batch, vocab, device="cuda").argsort(dim=-1)[:, :finite]
                        mask = torch.ones_like(logits, dtype=torch.bool).scatter_(1, keep, False)
                        logits = logits.masked_fill(mask, float("-inf"))
                    if min_p > 0:
                        probs = logits.softmax(-1)
                        logits = logits.masked_fill(probs < probs.amax(-1, keepdim=True) * min_p, float("-inf"))
                    p = torch.full((batch,), top_p, device="cuda")
                    k = None if top_k is None else torch.full((batch,), top_k, device="cuda", dtype=torch.long)
                    ref = torch.isfinite(apply_top_k_top_p_pytorch(logits.clone(), k, p))
                    tri = torch.isfinite(apply_top_k_top_p_triton(logits.clone(), k, p))
                    differ = (ref != tri).any(dim=-1)
                    rows.append(
                        {
                            "finite": finite,
                            "min_p": min_p,
                            "top_k": top_k,
                            "top_p": top_p,
                            "rows_differ": int(differ.sum()),
                            "rows": batch,
                            "kept_pytorch": float(ref.sum(-1).float().mean()),
                            "kept_triton": float(tri.sum(-1).float().mean()),
                            "triton_drops_kept": int((ref & ~tri).sum()),
                            "triton_keeps_dropped": int((~ref & tri).sum()),
                        }
                    )
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
