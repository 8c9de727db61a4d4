"""A test engine for the registry: the fp32 HF model sampled through the contract, in-process.

It exists to prove that a new engine is one module plus one registry line: ``tests/test_registry.py``
registers :func:`factory` under a name with :func:`conformance.engines.registry.register_engine`, names it
in a matrix cell's ``engine`` key, and runs the suite's own tests against it through the plugin. Being
the contract applied to the reference itself, it must pass every check it supports; it has none of the
optional capabilities (no prefix cache, no workers), so the tests that need them skip with the reason.

A cell whose ``env`` sets ``REFERENCE_ENGINE_VARIANT`` to a :data:`conformance.contract.VARIANTS` name gets
an engine that samples and reports under that step-order variant instead of the contract: a vLLM-free
engine with a known semantic bug, for the diagnosis tests (tests/test_diagnosis.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from conformance import contract
from conformance.engines.base import Request, Sample
from conformance.matrix import Cell
from conformance.reference import load_fp32_model
from conformance.spec import LogprobsMode, TokenContext

NAME = "reference-engine"


class ReferenceEngine:
    """Samples each request token by token from the contract's processed distribution of the fp32 model."""

    name = NAME
    version = "0.0.1"

    def __init__(self, cell: Cell, model_path: Path) -> None:
        from transformers import AutoTokenizer

        self.cell = cell
        variant = cell.env.get("REFERENCE_ENGINE_VARIANT")
        self.order = contract.VARIANTS[variant].order if variant else contract.CONTRACT_ORDER
        self.model = load_fp32_model(model_path).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)

    @property
    def logprobs_mode(self) -> LogprobsMode:
        return self.cell.logprobs_mode

    @property
    def description(self) -> str:
        return f"{NAME} {self.version} (contract over the fp32 HF model, tests/reference_engine.py)"

    def token_context(self, request: Request) -> TokenContext:
        stop = set(request.spec.stop_token_ids)
        if self.tokenizer.eos_token_id is not None:
            stop.add(int(self.tokenizer.eos_token_id))
        words = tuple(tuple(self.tokenizer.encode(w, add_special_tokens=False)) for w in request.spec.bad_words)
        return TokenContext(tuple(request.prompt_ids), frozenset(stop), tuple(w for w in words if w))

    @torch.no_grad()
    def _logits(self, ids: Sequence[int]) -> torch.Tensor:
        logits: torch.Tensor = self.model(input_ids=torch.tensor([list(ids)])).logits[0, -1].float()
        return logits

    def _sample(self, request: Request, generator: torch.Generator) -> Sample:
        spec, context = request.spec, self.token_context(request)
        output: list[int] = []
        rows: list[torch.Tensor] = []
        sampled: list[float | None] = []
        tops: list[dict[int, float]] = []
        for _ in range(spec.max_tokens):
            rows.append(self._logits(list(request.prompt_ids) + output))
            raw = torch.stack(rows)
            dist = contract.processed_distribution(raw, output + [0], spec, context, order=self.order)
            values = contract.mode_values(dist, raw, self.cell.logprobs_mode)[-1]
            probs = torch.softmax(dist.scaled[-1].masked_fill(~dist.kept[-1], float("-inf")), dim=-1)
            token = int(probs.argmax()) if spec.greedy else int(torch.multinomial(probs, 1, generator=generator))
            output.append(token)
            top = {int(t): float(values[t]) for t in torch.topk(values, spec.logprobs).indices} if spec.logprobs else {}
            tops.append({**top, token: float(values[token])})
            sampled.append(float(values[token]))
            if token in context.stop_token_ids and not spec.ignore_eos and len(output) > spec.min_tokens:
                break
        return Sample(tuple(request.prompt_ids), output, sampled, tops, "length")

    def generate(self, requests: Sequence[Request]) -> list[list[Sample]]:
        out = []
        for request in requests:
            generator = torch.Generator().manual_seed(request.spec.seed if request.spec.seed is not None else 0)
            out.append([self._sample(request, generator) for _ in range(request.spec.n)])
        return out

    def close(self) -> None:
        self.model = None


def factory(cell: Cell, model_path: Path) -> Any:
    """The registry's factory: ``register_engine("reference-engine", "tests.reference_engine:factory")``."""
    return ReferenceEngine(cell, model_path)
