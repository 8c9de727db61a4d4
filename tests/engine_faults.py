"""Faults planted inside the vLLM engine process, where a real bug would live.

:func:`install` sends (``llm.collective_rpc``; the engine runs with ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``)
a function that wraps, on the worker's model runner:

* ``sampler.forward`` (what the sampler reports as logprobs),
* ``sampler.apply_temperature`` (temperature scaling used for sampling *and* reporting),
* ``sampler.topk_topp_sampler.forward`` (truncation, the processed logprobs and the draw),
* ``model.compute_logits`` (the lm_head and the logits every path uses, prompt logprobs included);
* ``sampler.sample``, ``sampler.apply_logits_processors`` and ``sampler.apply_penalties`` (the order and
  the inputs of the sampler's steps: the step-order faults of issue 13, each one plausible implementation
  difference of one contract step, named like the :data:`conformance.contract.VARIANTS` it should be
  diagnosed as).

Every wrapper reads one mode from a per-runner state; ``none`` forwards unchanged. :func:`set_mode` switches
the mode with another RPC, so one engine serves every fault in turn, and :func:`uninstall` restores the
original attributes (the engine is then exactly the unpatched engine again). :func:`planted` does all three
as a context manager. vLLM 0.32's V1 ``Sampler`` / CPU model runner layout is assumed; anything else makes
:func:`install` raise with a one-line reason.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

MODES: dict[str, str] = {
    "none": "no fault: every wrapper forwards to vLLM's own code",
    "raw-logprobs": "the sampler reports raw logprobs (log_softmax of the model logits) in a processed_logprobs cell",
    "temperature-twice": "logits divided by the temperature twice (sampling and reported values)",
    "temperature-none": "temperature never applied (sampling and reported values)",
    "not-renormalised": "processed logprobs not renormalised after top-k/top-p (log_softmax before truncation, "
    "-inf outside the kept set)",
    "penalties-unreported": "sampling uses penalties/logit_bias, the reported logprobs are of the distribution "
    "without them (temperature and top-k/top-p still applied)",
    "bf16-logits": "the model's logits rounded to bfloat16 in an fp32 cell",
    "bf16-head": "the lm_head matmul in bfloat16 (hidden states and weights) where the cell configured fp32",
    "batch-noise": "logits perturbed (±0.01 by token id) whenever a step holds more than one sequence",
    "samples-elsewhere": "tokens drawn from logits sharpened 1.5x while the reported logprobs stay correct",
    # step-order faults: vLLM's own operations, in another order or on other inputs
    "top-p-before-min-p": "top-k/top-p applied before the min_p processor (top-p's mass includes what min_p removes)",
    "top-p-before-top-k": "top-p applied before top-k (top-p's mass includes what top-k removes)",
    "min-p-before-temperature": "the min_p processor applied before temperature scaling",
    "repetition-output-only": "the repetition penalty sees an empty prompt (only generated tokens count as seen)",
    "penalties-over-prompt": "frequency/presence penalties count the prompt's tokens as if generated",
    "temperature-before-penalties": "temperature applied before the logits processors and penalties "
    "(bias and frequency/presence act on z/T)",
    "bias-after-penalties": "the logit_bias processor applied after the penalties instead of before",
}
"""Fault mode -> what it plants."""

_STATE = "_parity_fault_state"
BATCH_DELTA = 0.01
SHARPEN = 1.5


def _install(worker: Any) -> str:
    """Runs in the engine process: wrap the sampler, temperature, truncation and logits (idempotent)."""
    import torch
    import torch.nn.functional as F
    from vllm.v1.sample.ops.bad_words import apply_bad_words
    from vllm.v1.sample.ops.penalties import apply_all_penalties
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

    runner = worker.model_runner
    if getattr(runner, _STATE, None) is not None:
        return "already installed"
    sampler = runner.sampler
    truncation = sampler.topk_topp_sampler
    model = runner.model
    state: dict[str, Any] = {"mode": "none", "saved": []}
    original_forward = sampler.forward
    original_temperature = sampler.apply_temperature
    original_truncation = truncation.forward
    original_logits = model.compute_logits
    original_sample = sampler.sample
    original_processors: Callable[[torch.Tensor, Any, bool], torch.Tensor] = sampler.apply_logits_processors
    original_penalties: Callable[[torch.Tensor, Any, list[list[int]]], torch.Tensor] = sampler.apply_penalties

    def unpenalised(logits: torch.Tensor, metadata: Any) -> torch.Tensor:
        """Processed logprobs computed without the logits processors and penalties."""
        values = logits.clone()
        if not metadata.all_greedy:
            values = original_temperature(values, metadata.temperature, metadata.all_random)
            for processor in metadata.logitsprocs.argmax_invariant:
                values = processor.apply(values)
            values = apply_top_k_top_p(values, metadata.top_k, metadata.top_p)
        return values.log_softmax(dim=-1, dtype=torch.float32)

    def forward(logits: torch.Tensor, sampling_metadata: Any, *args: Any, **kwargs: Any) -> Any:
        mode = state["mode"]
        metadata = sampling_metadata
        before = logits.to(torch.float32).clone() if mode in ("raw-logprobs", "penalties-unreported") else None
        out = original_forward(logits, metadata, *args, **kwargs)
        if before is None or out.logprobs_tensors is None or metadata.max_num_logprobs is None:
            return out
        values = before.log_softmax(dim=-1) if mode == "raw-logprobs" else unpenalised(before, metadata)
        sampled = out.sampled_token_ids[:, 0].long()
        out.logprobs_tensors = sampler.gather_logprobs(values, metadata.max_num_logprobs, sampled)
        return out

    def apply_temperature(logits: torch.Tensor, temp: torch.Tensor, all_random: bool) -> torch.Tensor:
        mode = state["mode"]
        if mode in ("temperature-none", "temperature-before-penalties"):
            return logits
        logits = original_temperature(logits, temp, all_random)
        if mode == "temperature-twice":
            logits = original_temperature(logits, temp, all_random)
        return logits

    def truncate_and_sample(logits: torch.Tensor, generators: Any, k: Any, p: Any) -> Any:
        mode = state["mode"]
        if mode == "not-renormalised":
            full = logits.log_softmax(dim=-1, dtype=torch.float32)
            sampled, processed = original_truncation(logits, generators, k, p)
            if processed is not None:
                processed = torch.where(torch.isfinite(processed), full, processed)
            return sampled, processed
        if mode == "samples-elsewhere":
            _, processed = original_truncation(logits.clone(), generators, k, p)
            sampled, _ = original_truncation(logits * SHARPEN, generators, k, p)
            return sampled, processed
        if mode == "top-p-before-top-k" and k is not None and p is not None:
            logits = apply_top_k_top_p(logits, None, p)
            logits = apply_top_k_top_p(logits, k, None)
            return original_truncation(logits, generators, None, None)
        return original_truncation(logits, generators, k, p)

    def split_min_p(metadata: Any) -> tuple[list[Any], list[Any]]:
        processors = list(metadata.logitsprocs.argmax_invariant)
        min_p = [q for q in processors if type(q).__name__ == "MinPLogitsProcessor"]
        return min_p, [q for q in processors if q not in min_p]

    def sample(logits: torch.Tensor, metadata: Any, *args: Any, **kwargs: Any) -> Any:
        """vLLM's random-sampling path (all rows random) with min_p moved; else vLLM's own."""
        mode = state["mode"]
        if mode not in ("top-p-before-min-p", "min-p-before-temperature") or not metadata.all_random:
            return original_sample(logits, metadata, *args, **kwargs)
        min_p, others = split_min_p(metadata)
        if mode == "min-p-before-temperature":
            for processor in min_p:
                logits = processor.apply(logits)
            logits = original_temperature(logits, metadata.temperature, metadata.all_random)
            for processor in others:
                logits = processor.apply(logits)
            return truncation.forward(logits, metadata.generators, metadata.top_k, metadata.top_p)
        logits = original_temperature(logits, metadata.temperature, metadata.all_random)
        for processor in others:
            logits = processor.apply(logits)
        logits = apply_top_k_top_p(logits, metadata.top_k, metadata.top_p)
        for processor in min_p:
            logits = processor.apply(logits)
        return truncation.forward(logits, metadata.generators, None, None)

    def apply_logits_processors(logits: torch.Tensor, metadata: Any, predict_bonus_token: bool) -> torch.Tensor:
        mode = state["mode"]
        if mode == "temperature-before-penalties" and metadata.temperature is not None:
            temp = torch.where(metadata.temperature < 1e-5, torch.ones_like(metadata.temperature), metadata.temperature)
            logits = logits / temp.unsqueeze(1)
        if mode != "bias-after-penalties":
            return original_processors(logits, metadata, predict_bonus_token)
        # vLLM's order (allowed ids, bad words, non-argmax-invariant processors, penalties) with the
        # logit-bias processor moved after the penalties (no speculative decoding here)
        if metadata.allowed_token_ids_mask is not None:
            logits.masked_fill_(metadata.allowed_token_ids_mask, float("-inf"))
        if metadata.bad_words_token_ids:
            apply_bad_words(logits, metadata.bad_words_token_ids, metadata.output_token_ids)
        processors = list(metadata.logitsprocs.non_argmax_invariant)
        bias = [q for q in processors if type(q).__name__ == "LogitBiasLogitsProcessor"]
        for processor in processors:
            if processor not in bias:
                logits = processor.apply(logits)
        logits = apply_penalties(logits, metadata, metadata.output_token_ids)
        for processor in bias:
            logits = processor.apply(logits)
        return logits

    def apply_penalties(logits: torch.Tensor, metadata: Any, output_token_ids: list[list[int]]) -> torch.Tensor:
        mode = state["mode"]
        if metadata.no_penalties or mode not in ("repetition-output-only", "penalties-over-prompt"):
            return original_penalties(logits, metadata, output_token_ids)
        prompt = metadata.prompt_token_ids
        vocab = logits.shape[-1]
        if mode == "repetition-output-only":
            prompt = torch.full_like(prompt, vocab)  # vocab is vLLM's padding id: an empty prompt
        else:
            output_token_ids = [
                [t for t in row if t < vocab] + list(out) for row, out in zip(prompt.tolist(), output_token_ids)
            ]
        penalised: torch.Tensor = apply_all_penalties(
            logits,
            prompt,
            metadata.presence_penalties,
            metadata.frequency_penalties,
            metadata.repetition_penalties,
            output_token_ids,
        )
        return penalised

    def compute_logits(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        mode = state["mode"]
        if mode == "bf16-head":
            weight = model.lm_head.weight
            logits = F.linear(hidden_states.to(torch.bfloat16), weight.to(torch.bfloat16)).to(hidden_states.dtype)
            return logits[..., : model.logits_processor.org_vocab_size]
        logits = original_logits(hidden_states, *args, **kwargs)
        if logits is None:
            return logits
        if mode == "bf16-logits":
            return logits.to(torch.bfloat16).to(logits.dtype)
        if mode == "batch-noise" and logits.shape[0] > 1:
            pattern = (torch.arange(logits.shape[-1], device=logits.device) % 3 - 1).to(logits.dtype)
            return logits + BATCH_DELTA * pattern
        return logits

    for owner, name, value in (
        (sampler, "forward", forward),
        (sampler, "apply_temperature", apply_temperature),
        (truncation, "forward", truncate_and_sample),
        (model, "compute_logits", compute_logits),
        (sampler, "sample", sample),
        (sampler, "apply_logits_processors", apply_logits_processors),
        (sampler, "apply_penalties", apply_penalties),
    ):
        state["saved"].append((owner, name, name in owner.__dict__, owner.__dict__.get(name)))
        object.__setattr__(owner, name, value)
    setattr(runner, _STATE, state)
    return "installed"


def _set_mode(worker: Any, mode: str) -> str:
    state = getattr(worker.model_runner, _STATE, None)
    if state is None:
        raise RuntimeError("engine faults are not installed in this worker")
    state["mode"] = mode
    return mode


def _uninstall(worker: Any) -> str:
    runner = worker.model_runner
    state = getattr(runner, _STATE, None)
    if state is None:
        return "not installed"
    for owner, name, had, value in reversed(state["saved"]):
        if not had:
            object.__delattr__(owner, name)
        else:
            object.__setattr__(owner, name, value)
    delattr(runner, _STATE)
    return "uninstalled"


def _rpc(llm: Any, fn: Any, *args: Any) -> list[Any]:
    import cloudpickle

    # The engine process may not have this repository's tests/ on sys.path: send the functions by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        results: list[Any] = llm.collective_rpc(fn, args=args)
        return results
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def install(llm: Any) -> None:
    """Wrap the engine's sampler and logits (mode ``none``); raises RuntimeError with a one-line reason."""
    try:
        _rpc(llm, _install)
    except Exception as exc:  # noqa: BLE001 - a layout this module does not know
        raise RuntimeError(f"cannot plant engine faults: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None


def set_mode(llm: Any, mode: str) -> None:
    """Switch the planted fault (one of :data:`MODES`)."""
    if mode not in MODES:
        raise ValueError(f"unknown fault mode {mode!r} (known: {', '.join(MODES)})")
    _rpc(llm, _set_mode, mode)


def uninstall(llm: Any) -> None:
    """Restore vLLM's own sampler, temperature, truncation and logits."""
    _rpc(llm, _uninstall)


@contextlib.contextmanager
def planted(llm: Any) -> Iterator[Any]:
    """Install the wrappers, yield a ``set_mode(mode)`` callable, always uninstall on exit."""
    install(llm)
    try:
        yield lambda mode: set_mode(llm, mode)
    finally:
        uninstall(llm)
