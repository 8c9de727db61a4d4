#!/usr/bin/env python3
"""Finding vllm-0.26-triton-topp-masked-rows: standalone reproduction.

vLLM 0.26.0's Triton top-k/top-p kernel (``vllm/v1/sample/ops/topk_topp_triton.py``, standalone top-p
branch) bisects for the top-p pivot in probability space on the interval [q_min, q_max], where q_min is
the probability of the row's *smallest finite* logit (-inf entries are excluded from the minimum,
lines 631-636, 677). Every candidate pivot is strictly above q_min and tokens count only when strictly
above the pivot (line 780), so when the nucleus needs the smallest finite token the termination test
(lines 792-800) can never pass; after 18 iterations the fallback pivot ``(max_range + min_range) / 2``
(lines 809-810) lies just above q_min, the final logit pivot (line 824) just above that token's logit,
and the strict ``>`` of the mask pass (line 839) drops it. Rows with -inf entries (min_p,
allowed_token_ids, bad_words, ...) are where the nucleus can need the smallest finite token.

This script (imports only torch, vllm, transformers and the standard library):

(a) kernel probe: vLLM's own dispatcher ``apply_top_k_top_p`` (what the V1 and V2 samplers call) and the
    Triton kernel ``apply_top_k_top_p_triton`` directly, against ``apply_top_k_top_p_pytorch``, over
    batch sizes on both sides of the dispatcher's threshold and a grid of masks, top_k and top_p; each
    row is also run through a predicate that emulates the kernel's branch decisions, to check that the
    predicate names exactly the rows that go wrong.
(b) end to end: ``vllm.LLM(..., logprobs_mode="processed_logprobs")`` on the bundled model with
    top_p=0.7056 + min_p=0.4687, and controls (min_p only, top_p only, a batch below the threshold),
    against an fp32 HuggingFace forward put through the contract's semantics, and the same semantics
    with the kernel's drop applied (the "bug model").

    python docs/findings/vllm-0.26-triton-topp-masked-rows.py [MODEL] [--prompts JSON] [--json OUT]
        [--skip-kernel] [--skip-e2e] [--runner default|v1|v2|both] [--cpu-e2e]

Exit code 0 whatever the outcome; the last line says "FINDING REPRODUCED: ..." or "not reproduced: ...".
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import os
import re
import sys
import time
import traceback
from pathlib import Path

import torch

FINDING = "vllm-0.26-triton-topp-masked-rows"
REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO / "conformance" / "fixtures" / "models" / "pystdlib-llama"
DEFAULT_PROMPTS = REPO / "conformance" / "fixtures" / "prompts" / "default.json"

NINF = float("-inf")
# The kernel's first statistics block on CUDA (apply_top_k_top_p_triton: block_size 8192 on GPUs).
CUDA_BLOCK_SIZE = 8192

BATCH_SIZES = (1, 2, 4, 7, 8, 9, 16, 32, 63, 64, 65, 128, 132, 133, 256)
GRID_ROWS = 128  # >= 8 (0.26 dispatcher -> Triton) and > 64 (0.33's split top-p pipeline not used)
KINDS = (
    "two_.6/.4",  # what min_p leaves: two finite entries, probabilities 0.6 / 0.4, random offset
    "min_p=0.3",  # randn*2.5 logits, then min_p 0.3 applied (as the sampler does) -> -inf
    "min_p=0.4687",  # the same with the lead's min_p
    "rand_k2",  # k random finite entries (randn*2.5) out of V, the rest -inf
    "rand_k4",
    "rand_k32",
    "rand_k512",
    "allowed_8",  # allowed_token_ids-like: one fixed id set for every row
    "allowed_64",
    "flat_n3-6",  # 3-6 finite, nearly flat: the nucleus needs the smallest finite logit
    "dense",  # all V finite
    "bad_words_64",  # dense with 64 ids -> -inf (bad_words style): masked, but min finite is tiny
    "bias-100_two",  # two_.6/.4 but the rest at -100 (logit_bias style, finite): control
)
TOP_P_NONE = (0.5, 0.71, 0.9, 0.99, 0.995)
TOP_P_WITH_K = (0.71, 0.9)

E2E_TOP_P = 0.7056
E2E_MIN_P = 0.4687
E2E_SEED = 2067
MISMATCH = 0.1  # |engine - contract| above this is a real mismatch (the bug gives >= 0.38 here)
MATCH = 0.05  # |engine - value| below this is agreement (GPU fp32 noise is ~2e-2 at worst)


# ----------------------------------------------------------------------------------------------------
# The predicate (emulates vLLM 0.26.0 topk_topp_triton.py's branch decisions for one row)
# ----------------------------------------------------------------------------------------------------


def sigma_table() -> list[float] | None:
    try:
        from vllm.v1.sample.ops.topk_topp_triton import _NORMAL_CDF_TO_SIGMA_TABLE

        return list(_NORMAL_CDF_TO_SIGMA_TABLE)
    except Exception:  # noqa: BLE001 - any version without the table
        return None


def predict_min_drop(
    logits: torch.Tensor,
    k: torch.Tensor | None,
    p: torch.Tensor | None,
    table: list[float] | None,
    block_size: int = CUDA_BLOCK_SIZE,
) -> torch.Tensor:
    """Rows where 0.26's Triton kernel drops the row's smallest finite logit (and its ties) although
    the V1 top-p rule keeps it. ``logits`` is what the kernel receives (after temperature, min_p, masks).

    Conditions (line numbers of vLLM 0.26.0 topk_topp_triton.py):
      * top-p active for the row: p < 1 (596-597);
      * the row takes the standalone top-p branch: top-k off for the row (k >= V, line 128) or
        k >= number of finite logits (375 sets final_pivot=-inf, 594);
      * at least two distinct finite logits;
      * the V1 rule keeps the smallest finite token: n_tied(min) * q_min > 1 - p, q = softmax over the
        finite logits (the ascending cumulative mass at the min group exceeds 1 - p);
      * the outlier branch is not taken (686): not every finite logit is above
        outlier_pivot = avg + std * (s - 0.25|s|), s = _NORMAL_CDF_TO_SIGMA_TABLE[int(p*200)], avg/std
        over the finite logits of the first ``block_size`` vocab entries (604-620, 646-650).
    """
    x = logits.float()
    bsz, vocab = x.shape
    dev = x.device
    if p is None:
        return torch.zeros(bsz, dtype=torch.bool, device=dev)
    p = p.to(dev).float()
    fin = torch.isfinite(x)
    nfin = fin.sum(-1)
    standalone = torch.ones(bsz, dtype=torch.bool, device=dev)
    if k is not None:
        kk = k.to(dev).long()
        standalone = (kk >= vocab) | (nfin <= kk)
    lmax = x.max(-1).values
    lmin = torch.where(fin, x, torch.full_like(x, float("inf"))).min(-1).values
    safe_max = torch.where(torch.isfinite(lmax), lmax, torch.zeros_like(lmax))
    denom = torch.exp(x - safe_max[:, None]).sum(-1)
    qmin = torch.exp(lmin - safe_max) / denom
    ntie = (x == lmin[:, None]).sum(-1)
    ref_keeps_min = ntie * qmin > 1 - p
    all_outliers = torch.zeros(bsz, dtype=torch.bool, device=dev)
    if table is not None:
        blk = x[:, : min(vocab, block_size)]
        f0 = torch.isfinite(blk)
        n0 = f0.sum(-1)
        b0 = torch.where(f0, blk, torch.zeros_like(blk))
        avg = torch.where(n0 > 0, b0.sum(-1) / n0.clamp(min=1), torch.zeros_like(lmax))
        sq = torch.where(n0 > 0, (b0 * b0).sum(-1) / n0.clamp(min=1), torch.zeros_like(lmax))
        std = (sq - avg * avg).clamp(min=0).sqrt()
        idx = (p * 200).to(torch.int32).clamp(0, len(table) - 1).long()
        sig = torch.tensor(table, dtype=torch.float32, device=dev)[idx]
        sig = sig - 0.25 * sig.abs()
        all_outliers = lmin > avg + std * sig
    return standalone & (p < 1) & (nfin >= 2) & (lmin < lmax) & ref_keeps_min & ~all_outliers


def min_group(logits: torch.Tensor) -> torch.Tensor:
    x = logits.float()
    lmin = torch.where(torch.isfinite(x), x, torch.full_like(x, float("inf"))).min(-1).values
    return x == lmin[:, None]


# ----------------------------------------------------------------------------------------------------
# (a) kernel probe
# ----------------------------------------------------------------------------------------------------


def make_rows(kind: str, bsz: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """Logits as the top-k/top-p step receives them (CPU, float32)."""

    def positions(n: int) -> torch.Tensor:
        return torch.rand(bsz, vocab, generator=gen).argsort(dim=-1)[:, :n]

    def scatter(vals: torch.Tensor, pos: torch.Tensor, fill: float = NINF) -> torch.Tensor:
        return torch.full((bsz, vocab), fill).scatter_(1, pos, vals)

    if kind in ("two_.6/.4", "bias-100_two"):
        off = torch.rand(bsz, 1, generator=gen) * 40 - 10
        vals = torch.tensor([[math.log(0.6), math.log(0.4)]]) + off
        if kind == "two_.6/.4":
            return scatter(vals, positions(2))
        base = -100.0 + 0.1 * torch.randn(bsz, vocab, generator=gen)
        return base.scatter_(1, positions(2), vals - off)  # the two tokens near 0, the rest near -100
    if kind.startswith("min_p="):
        min_p = float(kind.split("=")[1])
        z = torch.randn(bsz, vocab, generator=gen) * 2.5
        probs = z.softmax(-1)
        return z.masked_fill(probs < probs.amax(-1, keepdim=True) * min_p, NINF)
    if kind.startswith("rand_k"):
        n = int(kind[len("rand_k") :])
        return scatter(torch.randn(bsz, n, generator=gen) * 2.5, positions(n))
    if kind.startswith("allowed_"):
        n = int(kind[len("allowed_") :])
        ids = torch.randperm(vocab, generator=gen)[:n]
        return scatter(torch.randn(bsz, n, generator=gen) * 2.5, ids.expand(bsz, n).contiguous())
    if kind == "flat_n3-6":
        x = torch.full((bsz, vocab), NINF)
        pos = positions(6)
        n = torch.randint(3, 7, (bsz,), generator=gen)
        vals = torch.randn(bsz, 6, generator=gen) * 0.3
        keep = torch.arange(6)[None, :] < n[:, None]
        vals = torch.where(keep, vals, torch.full_like(vals, NINF))
        return x.scatter_(1, pos, vals)
    if kind == "dense":
        return torch.randn(bsz, vocab, generator=gen) * 2.5
    if kind == "bad_words_64":
        z = torch.randn(bsz, vocab, generator=gen) * 2.5
        return z.scatter_(1, positions(64), NINF)
    raise ValueError(kind)


def compare(x: torch.Tensor, k, p, fn, ref_fn, table) -> dict:
    """Kept sets of ``fn`` vs ``ref_fn`` (vLLM's PyTorch path) on the same rows, plus the predicate."""
    ref = torch.isfinite(ref_fn(x.clone(), None if k is None else k.clone(), p.clone()))
    got = torch.isfinite(fn(x.clone(), None if k is None else k.clone(), p.clone()))
    pred_rows = predict_min_drop(x, k, p, table)
    predicted = ref & ~(pred_rows[:, None] & min_group(x))
    dropped = ref & ~got
    extra = got & ~ref
    probs = torch.softmax(x.float(), dim=-1)
    mg = min_group(x)
    observed_min_drop = (dropped & mg).any(-1)
    return {
        "rows": x.shape[0],
        "differ": int((ref != got).any(-1).sum()),
        "dropped": int(dropped.sum()),
        "kept+": int(extra.sum()),
        "pred": int(pred_rows.sum()),
        "match": int((got == predicted).all(-1).sum()),
        "max_q_drop": float(probs[dropped].max()) if bool(dropped.any()) else 0.0,
        "max_q_kept+": float(probs[extra].max()) if bool(extra.any()) else 0.0,
        "drop_is_min": (float((dropped & mg).sum()) / max(int(dropped.sum()), 1)) if bool(dropped.any()) else None,
        # confusion of the predicate against what the kernel did to the min group
        "tp": int((pred_rows & observed_min_drop).sum()),
        "fp": int((pred_rows & ~observed_min_drop).sum()),
        "fn": int((~pred_rows & observed_min_drop).sum()),
    }


def dispatcher_threshold(apply_top_k_top_p) -> int | None:
    """Smallest batch the installed dispatcher sends to Triton on CUDA (0.26.0: 8); None if unknown."""
    try:
        src = inspect.getsource(apply_top_k_top_p)
    except (OSError, TypeError):
        return None
    m = re.search(r"HAS_TRITON and logits\.shape\[0\]\s*>=\s*(\d+)", src)
    if m:
        return int(m.group(1))
    if re.search(r"^\s*if HAS_TRITON:\s*$", src, re.MULTILINE):
        return 1
    return None


def fmt_row(cells: list, widths: list[int]) -> str:
    return " ".join(str(c).rjust(w) for c, w in zip(cells, widths))


def kernel_probe(
    dispatch,
    triton_fn,
    pytorch_fn,
    device: str,
    table,
    summary: dict,
    batch_sizes=BATCH_SIZES,
    grid_rows: int = GRID_ROWS,
    kinds=KINDS,
    big_vocab: int | None = 151936,
) -> None:
    vocab = 2048
    print(f"\n== (a) kernel probe: vocab {vocab}, device {device}; kept set vs apply_top_k_top_p_pytorch ==")
    print("   dispatcher = vllm.v1.sample.ops.topk_topp_sampler.apply_top_k_top_p (what both samplers call)")
    print("   triton     = vllm.v1.sample.ops.topk_topp_triton.apply_top_k_top_p_triton (called directly)")

    # 1. batch-size map
    print("\n-- batch sizes (top_k None) : rows whose kept set differs / rows; pred = rows the predicate names")
    w = [14, 6, 5, 16, 16, 6]
    print(fmt_row(["kind", "top_p", "bs", "dispatcher", "triton direct", "pred"], w))
    bs_map = []
    for kind in ("two_.6/.4", "min_p=0.4687", "dense"):
        for top_p in (0.71, 0.9):
            for bs in batch_sizes:
                gen = torch.Generator().manual_seed(1000 + bs)
                x = make_rows(kind, bs, vocab, gen).to(device)
                p = torch.full((bs,), top_p, device=device)
                d = compare(x, None, p, dispatch, pytorch_fn, table)
                t = compare(x, None, p, triton_fn, pytorch_fn, table)
                bs_map.append(
                    {
                        "kind": kind,
                        "top_p": top_p,
                        "bs": bs,
                        "dispatcher_differ": d["differ"],
                        "triton_differ": t["differ"],
                        "pred": t["pred"],
                    }
                )
                print(fmt_row([kind, top_p, bs, f"{d['differ']}/{bs}", f"{t['differ']}/{bs}", t["pred"]], w))
    summary["batch_map"] = bs_map

    # 2. grid at one batch size (dispatcher -> Triton)
    print(
        f"\n-- grid at bs={grid_rows} via the dispatcher. differ: rows whose kept set differs; dropped / kept+:"
        "\n   tokens the kernel wrongly drops / wrongly keeps; pred: rows the predicate names; match: rows whose"
        "\n   kept set equals the predicted one; max_q: largest probability (softmax over the row) among wrongly"
        "\n   dropped / kept tokens; min%: share of wrongly dropped tokens that are the row's smallest finite logit"
    )
    w = [14, 6, 6, 5, 7, 8, 6, 5, 6, 10, 10, 5]
    print(
        fmt_row(
            [
                "kind",
                "top_k",
                "top_p",
                "rows",
                "differ",
                "dropped",
                "kept+",
                "pred",
                "match",
                "max_q_drop",
                "max_q_kept+",
                "min%",
            ],
            w,
        )
    )
    grid = []
    tp = fp = fn = 0
    for ki, kind in enumerate(kinds):
        gen = torch.Generator().manual_seed(2000 + ki)
        x = make_rows(kind, grid_rows, vocab, gen).to(device)
        nfin = torch.isfinite(x).sum(-1).to(torch.int32)
        cases = [(None, tp_) for tp_ in TOP_P_NONE]
        cases += [("20", tp_) for tp_ in TOP_P_WITH_K] + [("n_fin", tp_) for tp_ in TOP_P_WITH_K]
        cases += [("2", 0.9)]  # top_k < n_finite: the top-k+top-p branch (expected correct)
        for klabel, top_p in cases:
            if klabel is None:
                k = None
            elif klabel in ("2", "20"):
                k = torch.full((grid_rows,), int(klabel), dtype=torch.int32, device=device)
            else:
                k = nfin.clone()
            p = torch.full((grid_rows,), top_p, device=device)
            r = compare(x, k, p, dispatch, pytorch_fn, table)
            tp, fp, fn = tp + r["tp"], fp + r["fp"], fn + r["fn"]
            grid.append({"kind": kind, "top_k": klabel, "top_p": top_p, **r})
            print(
                fmt_row(
                    [
                        kind,
                        klabel or "None",
                        top_p,
                        r["rows"],
                        r["differ"],
                        r["dropped"],
                        r["kept+"],
                        r["pred"],
                        r["match"],
                        f"{r['max_q_drop']:.3g}",
                        f"{r['max_q_kept+']:.3g}",
                        "-" if r["drop_is_min"] is None else f"{100 * r['drop_is_min']:.0f}",
                    ],
                    w,
                )
            )
    if big_vocab:
        gen = torch.Generator().manual_seed(3000)
        x = make_rows("min_p=0.3", 64, big_vocab, gen).to(device)
        for top_p in TOP_P_WITH_K:
            p = torch.full((64,), top_p, device=device)
            r = compare(x, None, p, triton_fn, pytorch_fn, table)
            tp, fp, fn = tp + r["tp"], fp + r["fp"], fn + r["fn"]
            grid.append({"kind": f"min_p=0.3,V={big_vocab}", "top_k": None, "top_p": top_p, **r})
            print(
                fmt_row(
                    [
                        f"min_p=.3,V{big_vocab // 1000}k",
                        "None",
                        top_p,
                        r["rows"],
                        r["differ"],
                        r["dropped"],
                        r["kept+"],
                        r["pred"],
                        r["match"],
                        f"{r['max_q_drop']:.3g}",
                        f"{r['max_q_kept+']:.3g}",
                        "-" if r["drop_is_min"] is None else f"{100 * r['drop_is_min']:.0f}",
                    ],
                    w,
                )
            )
    summary["grid"] = grid
    summary["predicate"] = {"tp": tp, "fp": fp, "fn": fn}
    print(
        f"\n   predicate vs kernel over the grid (rows): predicted and min token dropped {tp}, predicted but"
        f" kept {fp}, dropped but not predicted {fn}"
    )


def run_kernel_part(summary: dict, big_vocab: int | None) -> None:
    from vllm.v1.sample.ops import topk_topp_sampler as tts
    from vllm.v1.sample.ops.topk_topp_triton import apply_top_k_top_p_triton

    thr = dispatcher_threshold(tts.apply_top_k_top_p)
    summary["dispatcher_threshold"] = thr
    src = inspect.getsource(tts.apply_top_k_top_p)
    print("installed dispatcher (apply_top_k_top_p) source lines that route to Triton:")
    for line in src.splitlines():
        if "HAS_TRITON" in line or "shape[0]" in line:
            print("   |" + line)
    print(f"   -> Triton from batch size {thr} up on CUDA" if thr else "   -> threshold not recognised")
    table = sigma_table()
    if table is None:
        print("   (no _NORMAL_CDF_TO_SIGMA_TABLE in this vLLM: predicate without the outlier-branch test)")
    t0 = time.time()
    kernel_probe(
        tts.apply_top_k_top_p,
        apply_top_k_top_p_triton,
        tts.apply_top_k_top_p_pytorch,
        "cuda",
        table,
        summary,
        big_vocab=big_vocab,
    )
    torch.cuda.synchronize()
    summary["kernel_seconds"] = round(time.time() - t0, 1)
    print(f"   kernel probe took {summary['kernel_seconds']} s")


# ----------------------------------------------------------------------------------------------------
# (b) end to end
# ----------------------------------------------------------------------------------------------------


def top_p_keep(values: torch.Tensor, p: float) -> torch.Tensor:
    """V1 rule: sort ascending, drop where the cumulative mass <= 1 - p, never the last."""
    sorted_vals, order = torch.sort(values, dim=-1, descending=False)
    cum = torch.cumsum(torch.softmax(sorted_vals, dim=-1), dim=-1)
    drop = cum <= 1 - p
    drop[:, -1] = False
    return torch.zeros_like(drop).scatter(-1, order, ~drop)


def contract(raw: torch.Tensor, temperature: float, min_p: float, top_p: float):
    """The contract's steps 7-11 for rows of raw fp32 logits. Returns (processed logprobs, kernel input
    = the min_p-masked scaled logits, survivors)."""
    z = raw.float() / temperature
    keep = torch.isfinite(z)
    if min_p > 0:
        probs = torch.softmax(z, dim=-1)
        keep &= ~(probs < probs.amax(-1, keepdim=True) * min_p)
    stage = z.masked_fill(~keep, NINF)
    if top_p < 1:
        keep &= top_p_keep(stage, top_p)
    return z.masked_fill(~keep, NINF).log_softmax(-1), stage, keep


def near_boundary(raw: torch.Tensor, tokens: torch.Tensor, min_p: float, top_p: float) -> torch.Tensor:
    """Positions whose expected logprob moves by more than MATCH/2 when min_p is scaled by exp(+-0.02) or
    top_p moves by +-0.005 (a token near a cut that engine-vs-HF precision can legitimately flip)."""
    base = contract(raw, 1.0, min_p, top_p)[0].gather(1, tokens[:, None])[:, 0]
    flags = torch.zeros_like(base, dtype=torch.bool)
    variants = []
    if min_p > 0:
        variants += [(min_p * math.exp(s), top_p) for s in (-0.02, 0.02)]
    if top_p < 1:
        variants += [(min_p, min(1.0, top_p + s)) for s in (-0.005, 0.005)]
    for mp, tp in variants:
        v = contract(raw, 1.0, mp, tp)[0].gather(1, tokens[:, None])[:, 0]
        same_inf = torch.isinf(v) & torch.isinf(base)
        flags |= ~same_inf & ~((v - base).abs() <= MATCH / 2)
    return flags


def bug_model(z_stage: torch.Tensor, keep: torch.Tensor, top_p: float, table, temperature_scaled: torch.Tensor):
    """Processed logprobs with the 0.26 kernel's drop applied to the rows the predicate names."""
    p = torch.full((z_stage.shape[0],), top_p, device=z_stage.device)
    rows = (
        predict_min_drop(z_stage, None, p, table)
        if top_p < 1
        else torch.zeros(z_stage.shape[0], dtype=torch.bool, device=z_stage.device)
    )
    kept = keep & ~(rows[:, None] & min_group(z_stage))
    return temperature_scaled.masked_fill(~kept, NINF).log_softmax(-1), rows


def tokenize_prompts(model: str, prompts_path: Path, n: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    texts = json.loads(prompts_path.read_text())
    out = []
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        if tok.bos_token_id is not None and (not ids or ids[0] != tok.bos_token_id):
            ids = [tok.bos_token_id] + ids
        out.append(ids)
    while len(out) < n:
        out += out[: n - len(out)]
    return out[:n]


def generate(llm, prompts: list[list[int]], top_p: float, min_p: float) -> list[dict]:
    from vllm import SamplingParams

    sp = SamplingParams(temperature=1.0, top_p=top_p, min_p=min_p, max_tokens=8, logprobs=0, seed=E2E_SEED)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], sp, use_tqdm=False)
    res = []
    for ids, o in zip(prompts, outs):
        c = o.outputs[0]
        gen = list(c.token_ids)
        lps = [float(c.logprobs[j][t].logprob) for j, t in enumerate(gen)]
        res.append({"prompt": ids, "gen": gen, "engine": lps})
    return res


def hf_logits(model, seqs: list[list[int]], device: str) -> list[torch.Tensor]:
    out = []
    with torch.no_grad():
        for s in seqs:
            ids = torch.tensor([s], device=device)
            out.append(model(input_ids=ids).logits[0].float())
    return out


def load_hf(model_path: str, device: str):
    from transformers import AutoModelForCausalLM

    try:
        m = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    except TypeError:
        m = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32)
    return m.to(device).eval()


def score(
    setting: str, results: list[dict], hf, device: str, top_p: float, min_p: float, table, threshold: int | None
) -> list[dict]:
    """Per sampled token: engine value, contract value, bug-model value."""
    recs = []
    logits = hf_logits(hf, [r["prompt"] + r["gen"] for r in results], device)
    max_len = max((len(r["gen"]) for r in results), default=0)
    rows_at = [sum(1 for r in results if len(r["gen"]) > j) for j in range(max_len)]
    for ri, (r, lg) in enumerate(zip(results, logits)):
        n_prompt = len(r["prompt"])
        if not r["gen"]:
            continue
        raw = lg[n_prompt - 1 : n_prompt - 1 + len(r["gen"])]
        exp_lp, stage, keep = contract(raw, 1.0, min_p, top_p)
        boundary = near_boundary(raw, torch.tensor(r["gen"], device=raw.device), min_p, top_p)
        bug_lp, bug_rows = bug_model(stage, keep, top_p, table, raw.float() / 1.0)
        for j, t in enumerate(r["gen"]):
            rows = rows_at[j]
            kernel_used = threshold is not None and rows >= threshold
            bug_v = float(bug_lp[j, t]) if kernel_used else float(exp_lp[j, t])
            recs.append(
                {
                    "setting": setting,
                    "req": ri,
                    "pos": j,
                    "token": t,
                    "rows": rows,
                    "n_minp": int(torch.isfinite(stage[j]).sum()),
                    "n_kept": int(keep[j].sum()),
                    "engine": r["engine"][j],
                    "contract": float(exp_lp[j, t]),
                    "bug_model": bug_v,
                    "predicted": bool(bug_rows[j]) and kernel_used,
                    "boundary": bool(boundary[j]),
                }
            )
    return recs


def fnum(v: float) -> str:
    return "-inf" if v == NINF else f"{v:.4f}"


def report_setting(name: str, recs: list[dict]) -> dict:
    def d(r):
        if r["contract"] == NINF or r["engine"] == NINF:
            return math.inf if r["contract"] != r["engine"] else 0.0
        return abs(r["engine"] - r["contract"])

    clean = [r for r in recs if not r["boundary"]]
    mism = [r for r in clean if d(r) > MISMATCH]
    explained = [r for r in mism if r["bug_model"] != NINF and abs(r["engine"] - r["bug_model"]) < MATCH]
    pred = [r for r in clean if r["predicted"]]
    pred_hit = [r for r in pred if abs(r["engine"] - r["bug_model"]) < MATCH]
    worst = sorted(recs, key=d, reverse=True)[:8]
    mx = max((d(r) for r in clean), default=0.0)
    print(
        f"\n-- {name}: {len(recs)} tokens ({len(recs) - len(clean)} near a min_p/top_p boundary, left out of the"
        f" counts); max |engine - contract| {mx:.4g}; mismatches (> {MISMATCH}) {len(mism)}, of which the bug model"
        f" explains {len(explained)}; tokens the predicate names {len(pred)}, engine = bug model on {len(pred_hit)}"
    )
    w = [4, 4, 5, 6, 7, 7, 9, 9, 9, 8, 5]
    print(
        fmt_row(
            ["req", "pos", "rows", "token", "n_minp", "n_kept", "engine", "contract", "bug_model", "|delta|", "bnd"], w
        )
    )
    for r in worst:
        print(
            fmt_row(
                [
                    r["req"],
                    r["pos"],
                    r["rows"],
                    r["token"],
                    r["n_minp"],
                    r["n_kept"],
                    fnum(r["engine"]),
                    fnum(r["contract"]),
                    fnum(r["bug_model"]),
                    f"{d(r):.4g}",
                    "y" if r["boundary"] else "",
                ],
                w,
            )
        )
    return {
        "tokens": len(recs),
        "clean": len(clean),
        "max_abs": mx,
        "mismatch": len(mism),
        "explained": len(explained),
        "predicted": len(pred),
        "predicted_hit": len(pred_hit),
        "engine_zero_mismatch": sum(1 for r in mism if abs(r["engine"]) < 1e-4),
    }


def run_e2e(model: str, prompts_path: Path, n_req: int, runner: str, device: str, summary: dict) -> None:
    import vllm
    from vllm import LLM
    from vllm.v1.sample.ops import topk_topp_sampler as tts

    threshold = dispatcher_threshold(tts.apply_top_k_top_p) if device == "cuda" else None
    table = sigma_table()
    prompts = tokenize_prompts(model, prompts_path, n_req)
    settings = [
        ("top_p+min_p", prompts, E2E_TOP_P, E2E_MIN_P),
        ("min_p only (top_p=1)", prompts, 1.0, E2E_MIN_P),
        ("top_p only (min_p=0)", prompts, E2E_TOP_P, 0.0),
        ("top_p+min_p, 4 requests", prompts[:4], E2E_TOP_P, E2E_MIN_P),
    ]
    runners = ["v1", "v2"] if runner == "both" else [runner]
    all_results = {}
    for rn in runners:
        if rn == "v1":
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        elif rn == "v2":
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"
        t0 = time.time()
        llm = LLM(
            model=model,
            dtype="float32",
            logprobs_mode="processed_logprobs",
            enforce_eager=True,
            gpu_memory_utilization=0.15,
            generation_config="vllm",
            max_model_len=1024,
        )
        try:
            v2 = llm.llm_engine.vllm_config.use_v2_model_runner
        except Exception:  # noqa: BLE001
            v2 = "?"
        print(
            f"\n== (b) end to end: vLLM {vllm.__version__}, runner {rn} (use_v2_model_runner={v2}), engine up in"
            f" {time.time() - t0:.1f} s; {len(prompts)} prompt-token-id requests, temperature 1.0, max_tokens 8,"
            f" logprobs 0, seed {E2E_SEED}; kernel threshold {threshold} rows =="
        )
        for name, ps, top_p, min_p in settings:
            all_results[(rn, name)] = (generate(llm, ps, top_p, min_p), top_p, min_p, len(ps))
        del llm
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    hf = load_hf(model, device)
    e2e = {}
    for (rn, name), (res, top_p, min_p, n) in all_results.items():
        recs = score(name, res, hf, device, top_p, min_p, table, threshold)
        stats = report_setting(f"{rn}: {name}", recs)
        # the kernel can only bite where it runs (>= threshold rows) and where min_p leaves -inf entries
        stats["bug_setting"] = bool(threshold is not None and n >= threshold and top_p < 1 and min_p > 0)
        stats.update({"top_p": top_p, "min_p": min_p, "requests": n})
        e2e[f"{rn}: {name}"] = {"stats": stats, "records": recs}
    summary["e2e"] = e2e
    summary["e2e_threshold"] = threshold


# ----------------------------------------------------------------------------------------------------
# verdict
# ----------------------------------------------------------------------------------------------------


def verdict(summary: dict) -> str:
    parts = []
    kernel_ok = None
    if "grid" in summary:
        two = [g for g in summary["batch_map"] if g["kind"] == "two_.6/.4"]
        thr = summary.get("dispatcher_threshold")
        above = [g for g in two if thr is not None and g["bs"] >= thr]
        below = [g for g in two if thr is not None and g["bs"] < thr]
        n_above = sum(g["bs"] for g in above)
        d_above = sum(g["dispatcher_differ"] for g in above)
        d_below = sum(g["dispatcher_differ"] for g in below)
        kernel_ok = n_above > 0 and d_above >= 0.9 * n_above and d_below == 0
        pr = summary["predicate"]
        parts.append(
            f"kernel: two-finite rows (0.6/0.4, top_p 0.71/0.9) lose a token via the dispatcher in "
            f"{d_above}/{n_above} rows at bs>={thr} and {d_below}/{sum(g['bs'] for g in below)} below"
            f"{'' if kernel_ok else ' (NOT as expected)'}; predicate vs kernel over the grid tp/fp/fn "
            f"{pr['tp']}/{pr['fp']}/{pr['fn']}"
        )
    e2e_ok = None
    if "e2e" in summary:
        stats = {k: v["stats"] for k, v in summary["e2e"].items()}
        both = [s for s in stats.values() if s["bug_setting"]]
        ctrl = {k: s for k, s in stats.items() if not s["bug_setting"]}
        mism = sum(s["mismatch"] for s in both)
        expl = sum(s["explained"] for s in both)
        zero = sum(s["engine_zero_mismatch"] for s in both)
        pred = sum(s["predicted"] for s in both)
        hit = sum(s["predicted_hit"] for s in both)
        ctrl_max = max((s["max_abs"] for s in ctrl.values()), default=0.0)
        e2e_ok = bool(both) and mism > 0 and expl >= 0.9 * mism and ctrl_max < MISMATCH
        parts.append(
            f"e2e top_p={E2E_TOP_P}+min_p={E2E_MIN_P} at >= {summary.get('e2e_threshold')} rows: "
            f"{mism} tokens off the contract by > {MISMATCH} ({zero} returned 0.0), {expl} equal to "
            f"the kernel-drop model, predicate named {pred} tokens (engine = model on {hit}); "
            f"controls ({', '.join(ctrl)}) max |delta| {ctrl_max:.3g}"
        )
    if e2e_ok and kernel_ok is not False:
        return f"FINDING REPRODUCED: {FINDING}: " + "; ".join(parts)
    if e2e_ok is None and kernel_ok:
        return f"FINDING REPRODUCED: {FINDING} (kernel only, e2e skipped): " + "; ".join(parts)
    return f"not reproduced: {FINDING}: " + ("; ".join(parts) if parts else "nothing ran")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default=str(DEFAULT_MODEL))
    ap.add_argument("--prompts", default=str(DEFAULT_PROMPTS))
    ap.add_argument("--n-requests", type=int, default=16)
    ap.add_argument("--runner", choices=["default", "v1", "v2", "both"], default="default")
    ap.add_argument("--skip-kernel", action="store_true")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--cpu-e2e", action="store_true", help="run (b) on a CPU vLLM (validation only)")
    ap.add_argument("--json", default=None, help="write the measurements here")
    ap.add_argument(
        "--big-vocab",
        type=int,
        default=151936,
        help="also probe min_p rows at this vocab size (0 to skip; one more Triton compile)",
    )
    args = ap.parse_args(argv)
    if args.n_requests < 8:
        ap.error("--n-requests must be >= 8 (the batch must reach the kernel threshold)")

    summary: dict = {"finding": FINDING, "argv": sys.argv[1:]}
    t_start = time.time()
    try:
        import vllm

        cuda = torch.cuda.is_available()
        env = {
            k: os.environ.get(k)
            for k in ("VLLM_USE_FLASHINFER_SAMPLER", "VLLM_USE_V2_MODEL_RUNNER", "VLLM_BATCH_INVARIANT")
        }
        dev_name = torch.cuda.get_device_name(0) if cuda else "no CUDA"
        try:
            from importlib.metadata import version as _dist_version

            triton_v = _dist_version("triton")
        except Exception:  # noqa: BLE001
            triton_v = None
        summary.update(
            {"vllm": vllm.__version__, "torch": torch.__version__, "triton": triton_v, "device": dev_name, "env": env}
        )
        print(
            f"{FINDING}: vllm {vllm.__version__}, torch {torch.__version__}, triton {triton_v}, {dev_name}"
            + (f" ({torch.cuda.get_device_properties(0).multi_processor_count} SMs)" if cuda else "")
            + f", env {env}"
        )
        if args.skip_kernel:
            print("\n(a) kernel probe skipped (--skip-kernel)")
        elif not cuda:
            print("\n(a) kernel probe SKIPPED: torch.cuda is not available (the Triton kernel runs on CUDA only)")
        else:
            run_kernel_part(summary, args.big_vocab or None)
            torch.cuda.empty_cache()
        if args.skip_e2e:
            print("\n(b) end to end skipped (--skip-e2e)")
        elif not cuda and not args.cpu_e2e:
            print("\n(b) end to end SKIPPED: no CUDA (pass --cpu-e2e to exercise the CPU engine's path instead)")
        else:
            run_e2e(args.model, Path(args.prompts), args.n_requests, args.runner, "cuda" if cuda else "cpu", summary)
        line = verdict(summary)
        if not cuda:
            line = f"not reproduced: {FINDING}: no CUDA device here (the kernel is CUDA-only)" + (
                "; " + line.split(": ", 2)[-1] if "e2e" in summary else ""
            )
    except Exception as exc:  # noqa: BLE001 - report, never crash the combined GPU run
        traceback.print_exc()
        line = f"not reproduced: {FINDING}: script error {type(exc).__name__}: {exc}"
    summary["seconds"] = round(time.time() - t_start, 1)
    summary["verdict"] = line
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1, default=str))
    print(f"\n(total {summary['seconds']} s)")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
