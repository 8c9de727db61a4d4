"""TRL's GRPO trainer as the kit's trainer (TRL 1.16.0, imported, not copied).

How TRL 1.16's ``GRPOTrainer`` turns the policy into the per-token logprobs its loss and its vLLM
importance-sampling correction use (``trl/trainer/grpo_trainer.py``):

* ``__init__`` patches the policy with ``trl.trainer.utils.add_fused_lm_head(model,
  temperature=args.temperature, cast_lm_head_to_fp32=args.cast_lm_head_to_fp32, outputs=("log_probs",
  "entropy"))``: a chunked LM head that computes ``log_softmax(logits * (1 / T))`` over the **full
  vocabulary** at each label, without materialising the logits;
* ``_get_per_token_logps_and_entropies`` masks the prompt labels with -100 and calls
  ``model(input_ids, attention_mask, labels=labels, fused_lm_head=True)``, keeping
  ``outputs.log_probs[:, -logits_to_keep:]`` (``old_per_token_logps``);
* ``_generate_and_score_completions`` forms ``exp(old_per_token_logps − sampling_per_token_logps)`` with
  vLLM's sampled logprobs (requested with ``logprobs_mode="processed_logprobs"`` in colocate mode).

So TRL's GRPO trainer is a ``temperature-only`` trainer in the kit's terms: no top-p/top-k/min-p, no
penalties, temperature = the rollout's. The kit's ``--parity-trainer-fn`` protocol takes *logits* and
applies the declared semantics itself, so :func:`trainer_logits` returns the logits TRL's fused head
reads (the same patched model's un-fused forward), the example declares ``parity_trainer =
"temperature-only"``, and ``tests/test_framework_code.py`` proves the declaration: on these logits the
kit's ``temperature-only`` values equal :func:`grpo_per_token_logps` (TRL's own fused-head path) and
TRL's ``selective_log_softmax`` to 1e-6, at TRL's default temperature and at others.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from trl.trainer.utils import add_fused_lm_head

Pairs = list[tuple[list[int], list[int]]]

CAST_LM_HEAD_TO_FP32 = os.environ.get("TRL_CAST_LM_HEAD_TO_FP32", "0") == "1"
"""``GRPOConfig.cast_lm_head_to_fp32`` (default False; the example's model is fp32 anyway)."""


@lru_cache(maxsize=4)
def load_policy(model_path: str, temperature: float) -> torch.nn.Module:
    """The policy as GRPOTrainer holds it: fp32 HF model with TRL's fused LM head at ``temperature``."""
    model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.eval()
    add_fused_lm_head(
        model, temperature=temperature, cast_lm_head_to_fp32=CAST_LM_HEAD_TO_FP32, outputs=("log_probs", "entropy")
    )
    return model


@torch.no_grad()
def grpo_per_token_logps(sequences: Pairs, model_path: str | Path, temperature: float) -> list[torch.Tensor]:
    """TRL's own per-token logprobs of each completion (``old_per_token_logps``), as
    ``GRPOTrainer._get_per_token_logps_and_entropies`` computes them: labels = input ids with the prompt
    masked (-100), ``model(..., labels=labels, fused_lm_head=True).log_probs[:, -logits_to_keep:]``.
    One unpadded sequence per call (GRPO's padding only adds masked positions)."""
    model = load_policy(str(model_path), float(temperature))
    out = []
    for prompt, completion in sequences:
        input_ids = torch.tensor([list(prompt) + list(completion)])
        attention_mask = torch.ones_like(input_ids)
        logits_to_keep = len(completion)
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :-logits_to_keep] = -100
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
        out.append(outputs.log_probs[0, -logits_to_keep:].float())
    return out


@torch.no_grad()
def _logits(sequences: Pairs, model_path: str | Path, shift: int = 0) -> list[torch.Tensor]:
    model = load_policy(str(model_path), 1.0)
    out = []
    for prompt, completion in sequences:
        ids = torch.tensor([list(prompt) + list(completion)])
        logits = model(input_ids=ids).logits[0]  # fused_lm_head=False: the model's own forward
        start = len(prompt) - 1 + shift  # the position whose logits predict completion[0]
        out.append(logits[start : start + len(completion)].float())
    return out


def trainer_logits(sequences: Pairs, model_path: Path) -> list[torch.Tensor]:
    """``--parity-trainer-fn``: the logits TRL's fused head reads at each completion position."""
    return _logits(sequences, model_path)


def trainer_logits_off_by_one(sequences: Pairs, model_path: Path) -> list[torch.Tensor]:
    """A planted trainer bug: ``logits_to_keep`` one too small (labels read one position late). The last
    row repeats so that the shape stays right; the contract must catch it."""
    rows = _logits([(p, c + [c[-1]]) for p, c in sequences], model_path, shift=1)
    return [r[: len(c)] for r, (_, c) in zip(rows, sequences)]
