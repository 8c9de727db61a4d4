#!/usr/bin/env python3
"""Finding vllm-0.26-v2-runner-allowed-token-ids: standalone reproduction (vllm, torch, numpy, stdlib).

Suspected bug: with vLLM 0.26's default V2 model runner a request without ``allowed_token_ids`` is sometimes
sampled under the ``allowed_token_ids`` mask (or ``logit_bias``) of *another* request: a greedy request returns
a token that is not its argmax but lies in another request's allowed set. The V2 runner keeps the mask per
request *slot* (``LogitBiasState``, vllm/v1/worker/gpu/sample/logit_bias.py): the count per slot in a
``UvaBackedTensor`` (CPU numpy "source of truth" copied into one of two round-robin pinned host buffers that
the GPU reads through UVA, buffer_utils.py:44-111), the ids in a GPU tensor written by staged writes. The
Triton ``_bias_kernel`` (logit_bias.py:147-241) reads ``num_allowed_token_ids[slot]`` and the slot's id row
for every logits row; a slot whose count is seen non-zero applies whatever id row that slot holds.

What this script does (the cell gpu-bf16-raw of the parity kit: bf16, logprobs_mode raw_logprobs, V2 runner,
CUDA graphs + torch.compile, async scheduling and prefix caching at vLLM's defaults, FlashInfer sampler off):

1. reference: every prompt alone, greedy, 24 tokens, top-20 raw logprobs;
2. workload A (LLM.generate): many engine calls, each a random batch of "cases" like the kit's hypothesis
   batches (plain greedy, greedy top_k=1, greedy/sampled requests with allowed_token_ids or logit_bias,
   sampled requests with top_k/top_p/seed/n; the non-greedy ones also with penalties, min_p, min_tokens,
   bad_words), prompts and max_tokens mixed so that requests finish at different steps and slots are reused;
   each batch is repeated 1-4 calls in a row (as hypothesis does while shrinking) and the kit's failing batch
   is replayed every 7th batch; before it, 1500 draws in one call (the suite's preceding test) use every slot;
3. workload B (LLMEngine.add_request/step): requests join while others run;
4. checks: a plain greedy request (T=0, optional top_k=1, nothing else) must follow its alone continuation
   unless the alone top-2 are within 1 nat (bf16 batch noise); a request with allowed_token_ids must only
   return allowed tokens. A wrong greedy token that lies in an allowed set (or positively biased token) of a
   request of the same call, or of an earlier call (a stale slot), is counted as a leak;
5. mode ``probe`` (in-process engine, VLLM_ENABLE_V1_MULTIPROCESSING=0): before every V2 sampler call,
   gathers on the GPU what the GPU sees in ``num_allowed_token_ids`` / ``num_logit_bias`` / temperature /
   top_k / ``expanded_idx_mapping`` for each row and compares it, once the call's outputs are back, with the
   CPU numpy state and with the request's own SamplingParams (recorded when the runner added the request).

    python docs/findings/vllm-0.26-v2-runner-allowed-token-ids.py [--eager] [--budget S] [--modes mp,probe]
    python docs/findings/vllm-0.26-v2-runner-allowed-token-ids.py --concurrent --gpu-mem 0.08 --modes mp,mp,mp,mp,probe

The parent runs one child process per mode (``--concurrent``: all at once, several engines sharing the GPU
as in the suite) and exits 1 when any child saw a leak (a greedy request off its argmax by more than 1 nat
onto another request's allowed/biased token, an allowed_token_ids request returning a token outside its set,
or a GPU-visible slot value that differs from the CPU truth); 0 otherwise.

Measured on an H200 (vllm-0.26-v2-runner-allowed-token-ids.h200.log): NOT reproduced, 0 leaks in 96,371
plain greedy and 59,139 allowed_token_ids completions, and the probe saw GPU == CPU == request in
471,000 sampler rows. See the .md for what the suite's own records show.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "conformance" / "fixtures" / "models" / "pystdlib-llama"
PROMPTS = REPO / "conformance" / "fixtures" / "prompts" / "default.json"
REF_TOKENS = 24
GAP = 1.0  # nats: a greedy token this far below the alone argmax is not bf16 batch noise

# The kit's failing batch (suite H200 session 6, cell gpu-bf16-raw, jsonl records 716-719).
FAILING_ALLOWED = [0, 41, 91, 142, 148, 242, 504, 514, 614, 734, 977, 1022, 1379, 1402, 1429, 1818, 1835]


# ----------------------------------------------------------------------------------------------------------
# child: one engine, the workloads, the checks
# ----------------------------------------------------------------------------------------------------------
class Workload:
    def __init__(self, rng: random.Random, vocab: int, n_prompts: int, kitlike: bool = True) -> None:
        self.kitlike = kitlike
        self.rng = rng
        self.vocab = vocab
        self.n_prompts = n_prompts

    def spec(self) -> dict[str, Any]:
        r = self.rng
        kind = r.choices(["greedy", "greedy_top1", "allowed", "bias", "sample"], [3, 2, 3, 1, 2])[0]
        d: dict[str, Any] = {"kind": kind, "max_tokens": r.choice([1, 1, 2, 3, 5, 8, 13, 20, 24])}
        if kind == "greedy":
            d.update(temperature=0.0)
        elif kind == "greedy_top1":
            d.update(temperature=0.0, top_k=1)
        elif kind == "allowed":
            d.update(
                temperature=r.choice([0.0, 0.0, 0.6, 0.8]),
                allowed_token_ids=sorted(r.sample(range(self.vocab), r.randint(10, 60))),
            )
            if r.random() < 0.3:
                d["min_tokens"] = min(d["max_tokens"], r.randint(1, 5))
            if r.random() < 0.3:
                d["top_k"] = r.randint(5, 40)
            if d["temperature"] > 0 and r.random() < 0.3:
                d["n"] = r.choice([2, 3])
        elif kind == "bias":
            toks = r.sample(range(self.vocab), r.randint(1, 5))
            d.update(temperature=r.choice([0.0, 0.8]), logit_bias={t: r.uniform(4.0, 9.0) for t in toks})
        else:
            d.update(temperature=r.uniform(0.5, 1.0), top_k=r.choice([0, 8, 29, 50]), top_p=r.uniform(0.2, 0.95))
            if r.random() < 0.5:
                d["seed"] = r.randint(0, 2**31 - 1)
            if r.random() < 0.3:
                d["n"] = 2
        if kind in ("allowed", "bias", "sample") and self.kitlike:
            # the kit's hypothesis specs also set penalties, min_p, min_tokens, bad words on the same requests
            if r.random() < 0.4:
                d["repetition_penalty"] = r.uniform(0.5, 2.0)
            if r.random() < 0.3:
                d["frequency_penalty"] = r.uniform(-1.0, 1.0)
            if r.random() < 0.3:
                d["presence_penalty"] = r.uniform(-1.0, 1.0)
            if r.random() < 0.3:
                d["min_p"] = r.uniform(0.001, 0.5)
            if r.random() < 0.3:
                d["min_tokens"] = r.randint(1, d["max_tokens"])
            if kind != "allowed" and r.random() < 0.3:
                d["bad_words"] = r.sample(["le", "so", "ype", "qu", "ect", "P", "ill", "ck", "HT"], r.randint(1, 3))
        if r.random() < 0.4:
            d["logprobs"] = r.randint(0, 5)
        return d

    def batch(self) -> list[tuple[int, dict[str, Any]]]:
        r = self.rng
        out: list[tuple[int, dict[str, Any]]] = []
        for _ in range(r.randint(2, 5)):
            s = self.spec()
            for _ in range(r.randint(1, 6)):
                out.append((r.randrange(self.n_prompts), s))
        return out


def failing_batch() -> list[tuple[int, dict[str, Any]]]:
    a: dict[str, Any] = {
        "kind": "allowed",
        "temperature": 0.0,
        "logit_bias": {125: 0.0, 58: 0.0},
        "allowed_token_ids": FAILING_ALLOWED,
        "max_tokens": 1,
    }
    g1: dict[str, Any] = {"kind": "greedy_top1", "temperature": 0.0, "top_k": 1, "max_tokens": 1}
    g: dict[str, Any] = {"kind": "greedy", "temperature": 0.0, "max_tokens": 1}
    gl: dict[str, Any] = {"kind": "greedy", "temperature": 0.0, "max_tokens": 1, "logprobs": 1}
    return [(0, a), (0, a)] + [(p, g1) for p in (0, 2, 11, 14, 11, 2)] + [(0, gl), (0, g)]


def to_params(d: dict[str, Any]) -> Any:
    from vllm import SamplingParams

    kw = {k: v for k, v in d.items() if k != "kind"}
    return SamplingParams(**kw)


class Checker:
    def __init__(self, ref: dict[int, tuple[list[int], list[dict[int, float]]]]) -> None:
        self.ref = ref
        self.history: set[int] = set()  # tokens of every allowed set / positive bias seen so far
        self.stats = {
            "calls": 0,
            "greedy_checked": 0,
            "greedy_wrong": 0,
            "leak_current": 0,
            "leak_stale": 0,
            "wrong_unexplained": 0,
            "allowed_checked": 0,
            "allowed_violations": 0,
        }
        self.examples: list[str] = []

    def note(self, s: str) -> None:
        if len(self.examples) < 25:
            self.examples.append(s)

    @staticmethod
    def masks(d: dict[str, Any]) -> set[int]:
        s = set(d.get("allowed_token_ids") or [])
        s |= {t for t, b in (d.get("logit_bias") or {}).items() if b > 0}
        return s

    def check_call(self, where: str, items: list[tuple[int, dict[str, Any], list[list[int]]]]) -> None:
        """items: (prompt index, spec, token lists of the request's completions) of one engine call."""
        self.stats["calls"] += 1
        current: set[int] = set()
        for _, d, _ in items:
            current |= self.masks(d)
        for p, d, outs in items:
            if d["kind"] in ("greedy", "greedy_top1"):
                ref_toks, ref_lps = self.ref[p]
                for got in outs:
                    self.stats["greedy_checked"] += 1
                    for j, (a, b) in enumerate(zip(got, ref_toks)):
                        if a == b:
                            continue
                        lps = ref_lps[j]
                        floor = min(lps.values())
                        gap = lps[b] - lps.get(a, floor)
                        if gap < GAP:
                            break  # near-tie: legitimate bf16 batch difference, later positions not comparable
                        self.stats["greedy_wrong"] += 1
                        if a in current:
                            kind = "leak_current"
                        elif a in self.history:
                            kind = "leak_stale"
                        else:
                            kind = "wrong_unexplained"
                        self.stats[kind] += 1
                        self.note(
                            f"{where}: {kind}: prompt {p} {d} pos {j}: got {a}, alone argmax {b}, gap >= {gap:.2f}"
                        )
                        break
            allowed = d.get("allowed_token_ids")
            if allowed:
                aset = set(allowed)
                for got in outs:
                    self.stats["allowed_checked"] += 1
                    bad = [t for t in got if t not in aset]
                    if bad:
                        self.stats["allowed_violations"] += 1
                        self.note(f"{where}: allowed violation: prompt {p} {d}: tokens {bad[:5]} outside its set")
        self.history |= current


class Probe:
    """GPU-visible slot state vs CPU state vs the request's own params, per V2 sampler call."""

    def __init__(self) -> None:
        import numpy as np
        import torch
        from vllm.v1.worker.gpu import model_runner as mr
        from vllm.v1.worker.gpu.sample import sampler as smod

        self.np, self.torch = np, torch
        self.truth: dict[str, tuple[int, int]] = {}
        self.pending: list[tuple[Any, Any, list[str], Any]] = []
        self.stats = {"sampler_calls": 0, "rows": 0, "gpu_vs_cpu": 0, "cpu_vs_request": 0, "idx_gpu_vs_cpu": 0}
        self.examples: list[str] = []
        probe = self

        orig_add = mr.GPUModelRunner.add_requests

        def add_requests(runner: Any, scheduler_output: Any) -> Any:
            for new in scheduler_output.scheduled_new_reqs:
                sp = new.sampling_params
                if sp is not None:
                    probe.truth[new.req_id] = (len(sp.allowed_token_ids or []), len(sp.logit_bias or {}))
            return orig_add(runner, scheduler_output)

        mr.GPUModelRunner.add_requests = add_requests

        orig_call = smod.Sampler.__call__

        def call(sampler: Any, logits: Any, input_batch: Any) -> Any:
            idx_np = input_batch.idx_mapping_np
            exp = input_batch.expanded_idx_mapping
            real = all(r in probe.truth and not str(r).startswith("_warmup") for r in input_batch.req_ids)
            if real and exp.shape[0] == idx_np.shape[0] and idx_np.shape[0] > 0:
                lb = sampler.logit_bias_state
                exp64 = exp.to(torch.int64)
                ss = sampler.sampling_states
                gpu = torch.stack(
                    [
                        lb.num_allowed_token_ids.gpu[exp64].to(torch.int64),
                        lb.num_logit_bias.gpu[exp64].to(torch.int64),
                        exp64,
                        ss.temperature.gpu[exp64].contiguous().view(torch.int32).to(torch.int64),
                        ss.top_k.gpu[exp64].to(torch.int64),
                    ]
                )
                cpu = np.stack(
                    [
                        lb.num_allowed_token_ids.np[idx_np],
                        lb.num_logit_bias.np[idx_np],
                        idx_np,
                        np.ascontiguousarray(ss.temperature.np[idx_np]).view(np.int32),
                        ss.top_k.np[idx_np],
                    ]
                ).astype(np.int64)
                probe.pending.append((gpu, cpu, list(input_batch.req_ids), lb.num_allowed_token_ids.pool._curr))
            probe.stats["sampler_calls"] += 1
            return orig_call(sampler, logits, input_batch)

        smod.Sampler.__call__ = call

    def flush(self, where: str) -> None:
        np = self.np
        for gpu, cpu, req_ids, buf in self.pending:
            g = gpu.cpu().numpy()
            self.stats["rows"] += len(req_ids)
            for i, rid in enumerate(req_ids):
                want = self.truth.get(rid)
                if g[2, i] != cpu[2, i]:
                    self.stats["idx_gpu_vs_cpu"] += 1
                    self._note(f"{where}: row {i} req {rid}: GPU idx_mapping {g[2, i]} != CPU {cpu[2, i]}")
                if g[3, i] != cpu[3, i] or g[4, i] != cpu[4, i]:
                    self.stats["gpu_vs_cpu_temp_topk"] = self.stats.get("gpu_vs_cpu_temp_topk", 0) + 1
                    self._note(
                        f"{where}: row {i} req {rid} slot {cpu[2, i]}: GPU temperature bits/top_k "
                        f"{g[3, i]}/{g[4, i]}, CPU {cpu[3, i]}/{cpu[4, i]}"
                    )
                if g[0, i] != cpu[0, i] or g[1, i] != cpu[1, i]:
                    self.stats["gpu_vs_cpu"] += 1
                    self._note(
                        f"{where}: row {i} req {rid} slot {cpu[2, i]} (uva buffer {buf}): GPU sees "
                        f"num_allowed={g[0, i]} num_bias={g[1, i]}, CPU has {cpu[0, i]}/{cpu[1, i]}, request {want}"
                    )
                if want is not None and (cpu[0, i], cpu[1, i]) != want:
                    self.stats["cpu_vs_request"] += 1
                    self._note(
                        f"{where}: row {i} req {rid} slot {cpu[2, i]}: CPU num_allowed/num_bias "
                        f"{cpu[0, i]}/{cpu[1, i]} but the request has {want}"
                    )
        self.pending.clear()
        del np

    def _note(self, s: str) -> None:
        if len(self.examples) < 25:
            self.examples.append(s)


def child(mode: str, eager: bool, budget: float, seed: int, gpu_mem: float) -> None:
    if mode == "probe":
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    from vllm import LLM, SamplingParams

    probe = Probe() if mode == "probe" else None
    t0 = time.time()
    llm = LLM(
        model=str(MODEL),
        dtype="bfloat16",
        logprobs_mode="raw_logprobs",
        enforce_eager=eager,
        max_model_len=1024,
        max_logprobs=-1,
        gpu_memory_utilization=gpu_mem,
        kv_cache_memory_bytes=1 << 30,
        seed=0,
    )
    cfg = llm.llm_engine.vllm_config
    print(
        f"[{mode}] engine up in {time.time() - t0:.1f}s: use_v2_model_runner={cfg.use_v2_model_runner} "
        f"async_scheduling={cfg.scheduler_config.async_scheduling} enforce_eager={eager} "
        f"prefix_caching={cfg.cache_config.enable_prefix_caching} max_num_seqs={cfg.scheduler_config.max_num_seqs} "
        f"max_num_batched_tokens={cfg.scheduler_config.max_num_batched_tokens}",
        flush=True,
    )
    tok = llm.get_tokenizer()
    texts = json.loads(PROMPTS.read_text())
    ids = [[tok.bos_token_id, *tok.encode(t, add_special_tokens=False)][:900] for t in texts]
    vocab = cfg.model_config.get_vocab_size()

    # 1. reference: each prompt alone
    ref: dict[int, tuple[list[int], list[dict[int, float]]]] = {}
    for p, pid in enumerate(ids):
        out = llm.generate(
            [{"prompt_token_ids": pid}],
            SamplingParams(temperature=0.0, max_tokens=REF_TOKENS, logprobs=20),
            use_tqdm=False,
        )[0].outputs[0]
        ref[p] = (list(out.token_ids), [{t: lp.logprob for t, lp in e.items()} for e in out.logprobs])
    checker = Checker(ref)
    if probe:
        probe.flush("reference")

    # the suite's test before the failing ones: 1500 draws at once (all slots used, free list scrambled)
    llm.generate(
        [{"prompt_token_ids": ids[0]}] * 1500,
        SamplingParams(temperature=1.0, top_k=8, max_tokens=1, logprobs=20),
        use_tqdm=False,
    )

    rng = random.Random(seed)
    work = Workload(rng, vocab, len(ids))
    deadline = time.time() + budget
    half = time.time() + budget * 0.65

    # 2. workload A: LLM.generate calls
    n = 0
    batch: list[tuple[int, dict[str, Any]]] = []
    repeats = 0
    while time.time() < half:
        if repeats <= 0:  # like hypothesis while shrinking: the same batch several calls in a row
            batch = failing_batch() if n % 7 == 3 else work.batch()
            repeats = rng.choice([1, 1, 2, 3, 4])
        repeats -= 1
        outs = llm.generate(
            [{"prompt_token_ids": ids[p]} for p, _ in batch], [to_params(d) for _, d in batch], use_tqdm=False
        )
        checker.check_call(
            f"A call {n}", [(p, d, [list(c.token_ids) for c in o.outputs]) for (p, d), o in zip(batch, outs)]
        )
        if probe:
            probe.flush(f"A call {n}")
        n += 1
    print(f"[{mode}] workload A: {n} engine calls; {checker.stats}", flush=True)

    # 3. workload B: requests join while others run (LLMEngine step API)
    engine = llm.llm_engine
    live: dict[str, tuple[int, dict[str, Any]]] = {}
    done: list[tuple[int, dict[str, Any], list[list[int]]]] = []
    k = steps = 0
    while time.time() < deadline or live:
        if time.time() < deadline and (len(live) < 4 or rng.random() < 0.5):
            for _ in range(rng.randint(1, 3)):
                p, d = rng.randrange(len(ids)), work.spec()
                rid = f"b{k}"
                k += 1
                engine.add_request(rid, {"prompt_token_ids": ids[p]}, to_params(d))
                live[rid] = (p, d)
        for o in engine.step():
            if o.finished and o.request_id in live:
                p, d = live.pop(o.request_id)
                done.append((p, d, [list(c.token_ids) for c in o.outputs]))
        steps += 1
        if len(done) >= 16:
            checker.check_call(f"B step {steps}", done)
            done = []
            if probe:
                probe.flush(f"B step {steps}")
    if done:
        checker.check_call(f"B step {steps}", done)
    if probe:
        probe.flush("end")
    print(f"[{mode}] workload B: {k} requests over {steps} steps", flush=True)
    for e in checker.examples:
        print(f"[{mode}]   {e}")
    if probe:
        print(f"[{mode}] probe: {probe.stats}")
        for e in probe.examples:
            print(f"[{mode}]   probe {e}")
    result = {"mode": mode, **checker.stats, **({"probe": probe.stats} if probe else {})}
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", default=None)
    ap.add_argument("--eager", action="store_true", help="enforce_eager=True (the kit's cell runs with graphs)")
    ap.add_argument("--budget", type=float, default=150.0, help="seconds of workload per mode (after start-up)")
    ap.add_argument("--modes", default="mp,probe", help="mp = multiprocess engine like the suite; probe = in-process")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--gpu-mem", type=float, default=0.2, help="gpu_memory_utilization (the kit's cells: 0.08)")
    ap.add_argument(
        "--concurrent",
        action="store_true",
        help="run the modes' engines at the same time on the GPU (the suite ran 8 pytest workers)",
    )
    args = ap.parse_args()
    if args.child:
        child(args.child, args.eager, args.budget, args.seed, args.gpu_mem)
        return
    import vllm

    print(
        f"vllm {vllm.__version__}; model {MODEL.name}; VLLM_USE_V2_MODEL_RUNNER={os.environ.get('VLLM_USE_V2_MODEL_RUNNER')}"
    )
    results: list[dict[str, Any]] = []
    modes = args.modes.split(",")

    def command(i: int, mode: str) -> list[str]:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            mode,
            "--budget",
            str(args.budget),
            "--seed",
            str(args.seed + i),
            "--gpu-mem",
            str(args.gpu_mem),
        ]
        return cmd + (["--eager"] if args.eager else [])

    def report(mode: str, out: str, err: str, code: object, t: float) -> None:
        lines = [x for x in out.splitlines() if x.startswith(("[", "RESULT"))]
        print("\n".join(lines) if lines else err[-3000:])
        print(f"({mode}: exit {code}, {time.time() - t:.0f}s)", flush=True)
        results.extend(json.loads(x[7:]) for x in lines if x.startswith("RESULT"))

    if args.concurrent:
        import tempfile

        t = time.time()
        tmp = Path(tempfile.mkdtemp(prefix="v2leak-"))
        procs: list[tuple[int, str, subprocess.Popen[str]]] = []
        with contextlib.ExitStack() as stack:  # the output files stay open while the children run
            for i, m in enumerate(modes):  # output to files: pipes of engines that log a lot would fill and block
                fo = stack.enter_context(open(tmp / f"{i}.out", "w"))
                fe = stack.enter_context(open(tmp / f"{i}.err", "w"))
                procs.append((i, m, subprocess.Popen(command(i, m), stdout=fo, stderr=fe, text=True)))
            for i, m, proc in procs:
                try:
                    code: object = proc.wait(timeout=max(10.0, args.budget + 300 - (time.time() - t)))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    code = "timeout"
                report(m, (tmp / f"{i}.out").read_text(), (tmp / f"{i}.err").read_text(), code, t)
    else:
        for i, mode in enumerate(modes):
            t = time.time()
            try:
                completed = subprocess.run(
                    command(i, mode), check=False, capture_output=True, text=True, timeout=args.budget + 300
                )
                out, err, code = completed.stdout, completed.stderr, completed.returncode
            except subprocess.TimeoutExpired as exc:
                raw_out, raw_err, code = exc.stdout or "", exc.stderr or "", "timeout"
                out, err = (x.decode() if isinstance(x, bytes) else x for x in (raw_out, raw_err))
            report(mode, out, err, code, t)
    leaks = 0
    for r in results:
        pr = r.get("probe") or {}
        leaks += r["leak_current"] + r["leak_stale"] + r["allowed_violations"]
        leaks += pr.get("gpu_vs_cpu", 0) + pr.get("cpu_vs_request", 0) + pr.get("idx_gpu_vs_cpu", 0)
        leaks += pr.get("gpu_vs_cpu_temp_topk", 0)
        print(
            f"SUMMARY {r['mode']}: {r['greedy_wrong']} of {r['greedy_checked']} plain greedy requests off their argmax "
            f"(>= {GAP} nat): {r['leak_current']} onto a token of another request's allowed/bias set in the same "
            f"call, {r['leak_stale']} onto one of an earlier call, {r['wrong_unexplained']} other; "
            f"{r['allowed_violations']} of {r['allowed_checked']} allowed_token_ids completions outside their set"
            + (f"; probe {pr}" if pr else "")
        )
    if leaks:
        print(f"FINDING REPRODUCED: {leaks} leaks (see SUMMARY lines)")
        sys.exit(1)
    print("not reproduced: no leak in " + ", ".join(r["mode"] for r in results))


if __name__ == "__main__":
    main()
