"""Probe: does vLLM's Triton top-k/top-p kernel keep the same tokens as its PyTorch reference path?

Found by the parity suite on vLLM 0.26.0 (H200): with allowed_token_ids + min_p + top_p, the engine's
processed logprob of a sampled token was 0 (a lone survivor) where the V1 semantics (and the CPU engine)
keep two tokens. This script compares ``apply_top_k_top_p_triton`` with ``apply_top_k_top_p_pytorch``
on logits with many -inf entries (what allowed_token_ids and min_p leave) and prints a table.

    python benchmarks/gpu_topp_probe.py [--json OUT]
    python benchmarks/gpu_topp_probe.py --sharp [--json OUT]   # temperature-scaled rows: tokens kept extra

``--sharp`` scales the logits by 1/T (T down to 0.005, as the suite draws) over rows with few finite tokens
and small top_p, and splits the tokens the Triton kernel keeps but the PyTorch path drops by their
probability: ``keeps_zero_prob`` (probability 0 in fp32: no mass, either reading is legitimate) and
``keeps_real_prob`` (a token with probability that top-p must drop: a divergence), with the largest such
probability.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch


def main() -> None:
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch
    from vllm.v1.sample.ops.topk_topp_triton import apply_top_k_top_p_triton

    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    parser.add_argument("--sharp", action="store_true")
    args = parser.parse_args()
    if args.sharp:
        _report(_sharp_rows(apply_top_k_top_p_pytorch, apply_top_k_top_p_triton), args.json)
        return
    torch.manual_seed(0)
    vocab, batch = 2048, 256
    rows = []
    for finite in (vocab, 512, 32, 4):
        for min_p in (0.0, 0.3):
            for top_k in (None, 20):
                for top_p in (0.5, 0.76, 0.86, 0.95):
                    logits = _rows(batch, vocab, finite, min_p)
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
    _report(rows, args.json)


def _rows(batch: int, vocab: int, finite: int, min_p: float, temperature: float = 1.0) -> torch.Tensor:
    """Random logits (N(0, 2.5^2)) with all but ``finite`` random tokens per row at -inf (what
    allowed_token_ids leaves), divided by ``temperature``, then min_p applied (what the sampler hands top-p)."""
    logits = torch.randn(batch, vocab, device="cuda") * 2.5
    if finite < vocab:
        keep = torch.rand(batch, vocab, device="cuda").argsort(dim=-1)[:, :finite]
        mask = torch.ones_like(logits, dtype=torch.bool).scatter_(1, keep, False)
        logits = logits.masked_fill(mask, float("-inf"))
    logits = logits / temperature
    if min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < probs.amax(-1, keepdim=True) * min_p, float("-inf"))
    return logits


def _sharp_rows(pytorch_fn: Any, triton_fn: Any) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    vocab, batch = 2048, 64
    rows: list[dict[str, Any]] = []
    for temperature in (1.0, 0.3, 0.05, 0.005):
        for finite in (vocab, 64, 17, 4):
            for min_p in (0.0, 0.3):
                for top_p in (0.1, 0.25, 0.5, 0.9):
                    logits = _rows(batch, vocab, finite, min_p, temperature)
                    p = torch.full((batch,), top_p, device="cuda")
                    ref = torch.isfinite(pytorch_fn(logits.clone(), None, p))
                    tri = torch.isfinite(triton_fn(logits.clone(), None, p))
                    probs = logits.softmax(-1)
                    extra = ~ref & tri
                    real = extra & (probs > 0)
                    rows.append(
                        {
                            "T": temperature,
                            "finite": finite,
                            "min_p": min_p,
                            "top_p": top_p,
                            "rows": batch,
                            "rows_differ": int((ref != tri).any(dim=-1).sum()),
                            "drops_kept": int((ref & ~tri).sum()),
                            "keeps_zero_prob": int((extra & (probs == 0)).sum()),
                            "keeps_real_prob": int(real.sum()),
                            "rows_keeping_real": int(real.any(dim=-1).sum()),
                            "max_prob_kept_extra": float(probs[real].max()) if bool(real.any()) else 0.0,
                        }
                    )
    return rows


def _report(rows: list[dict[str, Any]], path: str | None) -> None:
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    if path:
        with open(path, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
