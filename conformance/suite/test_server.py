"""Server layer: vLLM's OpenAI-compatible server returns what the offline engine returns for the same cell.

Server cells (``engine = "vllm-server"``) run the semantic family like any cell (their values against the
contract over the reference); this family adds the comparison of the two access paths: the same greedy
and seeded requests (with prompt logprobs) sent to the cell's server and to an offline ``vllm.LLM``
started with the same configuration must choose the same tokens and agree value by value within the
cell's tolerance, and both must pass the parity check. A failure here, with both engines passing on
their own, points at the server layer (request mapping, JSON encoding, -9999.0 for -inf, token ids).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from conformance.engines.base import Request
from conformance.matrix import Cell
from conformance.path_comparison import compare_samples
from conformance.plugin.fixture import Parity
from conformance.spec import SamplingSpec

pytestmark = [pytest.mark.parity, pytest.mark.family("server")]

SPECS = (
    SamplingSpec(temperature=0.0, max_tokens=12, logprobs=5, repetition_penalty=1.2),
    SamplingSpec(
        temperature=0.8,
        top_k=20,
        top_p=0.9,
        max_tokens=12,
        n=2,
        seed=1234,
        logprobs=5,
        logit_bias=((17, 2.0),),
        min_tokens=3,
    ),
)
PROMPTS = (0, 3, 7, 12)


def offline_twin(cell: Cell) -> Cell:
    """The offline cell of a server cell's configuration (it shares the pooled engine of any cell like it)."""
    return dataclasses.replace(cell, engine="vllm", id=f"{cell.id}~offline")


def offline_twins(selected: list[Cell], own: list[Cell]) -> list[Cell]:
    return [offline_twin(c) for c in own if c.engine == "vllm-server"]


@pytest.mark.parity_engines.with_args(offline_twins)
def test_server_agrees_with_offline(parity: Parity, parity_session: Any) -> None:
    """Same cell, same requests: server and offline engine choose the same tokens with equal values."""
    cell = parity.cell
    if cell.engine != "vllm-server":
        pytest.skip(f"cell {cell.id} is not a server cell (engine = {cell.engine!r})")
    offline = parity_session.shared_handle(offline_twin(cell))  # an offline cell of the same configuration shares it
    for spec in SPECS:
        requests = [Request(parity.prompts.ids[i], spec, prompt_logprobs=3 if i == 0 else None) for i in PROMPTS]
        repro = f"prompts={list(PROMPTS)} {spec.describe()} (prompt_logprobs=3 on the first)"
        served = parity.generate_or_report(requests, repro)
        parity.assert_passed(parity.judge(requests, served))
        local = offline.engine.generate(requests)
        tolerance = parity.max_abs(spec)
        names = (f"{cell.id} offline", f"{cell.id} server")
        for index, (a, b) in enumerate(zip(local, served, strict=True)):
            comparison = compare_samples(a, b, cell.id, names, tolerance, f"{spec.describe()}, prompt {PROMPTS[index]}")
            assert comparison.passed and not comparison.divergences, comparison.explain()
        prompt_a, prompt_b = local[0][0].prompt_values, served[0][0].prompt_values
        assert len(prompt_a) == len(prompt_b) == len(requests[0].prompt_ids), (len(prompt_a), len(prompt_b))
        worst = max(
            (
                abs(va - vb)
                for a, b in zip(prompt_a[1:], prompt_b[1:])
                for t, va in (a or {}).items()
                if (vb := (b or {}).get(t)) is not None
            ),
            default=0.0,
        )
        assert worst <= cell.tolerance.max_abs, (
            f"prompt logprobs: server vs offline max |Δ| {worst:.3g} > {cell.tolerance.max_abs:g} in cell {cell.id}"
        )
