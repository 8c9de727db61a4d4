"""This repo's trainer-side logprob computation, as an RL framework does it (verl / OpenRLHF style).

``logprobs_from_logits`` is what the training loss uses. ``trainer_logits`` exposes the logits it
consumes, in the kit's ``--parity-trainer-fn`` protocol: per (prompt, completion) pair, fp32 logits
``[len(completion), vocab]`` at the positions that predict each completion token.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


@lru_cache(maxsize=2)
def load_policy(model_path: str) -> torch.nn.Module:
    model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return model.eval()


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The loss's logprobs: log_softmax(logits / T) gathered at the labels (full vocabulary)."""
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def _forward(sequences: list[tuple[list[int], list[int]]], model_path: Path, shift: int) -> list[torch.Tensor]:
    model = load_policy(str(model_path))
    out = []
    for prompt, completion in sequences:
        ids = torch.tensor([prompt + completion])
        logits = model(input_ids=ids).logits[0]
        start = len(prompt) - 1 + shift  # the position whose logits predict completion[0]
        out.append(logits[start : start + len(completion)].float())
    return out


def trainer_logits(sequences: list[tuple[list[int], list[int]]], model_path: Path) -> list[torch.Tensor]:
    """Our trainer's logits at the completion positions (what logprobs_from_logits receives)."""
    return _forward(sequences, model_path, shift=0)


def trainer_logits_off_by_one(sequences: list[tuple[list[int], list[int]]], model_path: Path) -> list[torch.Tensor]:
    """A planted trainer bug (labels misaligned by one position); the contract test must catch it.
    The last row repeats so that the shape is still right."""
    rows = _forward([(p, c + [c[-1]]) for p, c in sequences], model_path, shift=1)
    return [r[: len(c)] for r, (_, c) in zip(rows, sequences)]
