"""The fp32 reference: a teacher-forced HuggingFace-transformers forward over prompt + completion.

:class:`HFReference` returns, for each sequence, the fp32 raw logits at every generated position
(``logits[i]`` predicted ``output_ids[i]``), which the contract turns into whatever the engine's
logprobs are supposed to mean.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


class ReferenceError(ValueError):
    """The reference model cannot be loaded; the message is one line naming the path."""


def load_fp32_model(model_path: Path, device: str = "cpu") -> Any:
    """``AutoModelForCausalLM`` from a local directory in float32 on ``device`` (typed ``Any``: transformers'
    decorated ``from_pretrained`` does not type-check as a classmethod)."""
    from transformers import AutoModelForCausalLM

    loader: Any = AutoModelForCausalLM
    return loader.from_pretrained(model_path, dtype=torch.float32).to(device)


class HFReference:
    """An HF causal LM in float32 on ``device``, evaluated without gradients.

    Each sequence is its own forward pass by default (``max_batch_tokens=1``): no padding, so a sequence's
    logits do not depend on what else was scored with it, and on the CPU it is also the fastest (measured:
    24 sequences of 5-730 tokens in 0.60 s one by one, 0.68-0.86 s right-padded in batches of 512-2048
    padded tokens, 2.98 s at 16384: padding to the longest member dominates). A larger ``max_batch_tokens``
    batches sequences right-padded (real tokens start at position 0, so the default position ids are
    right) with an attention mask, at most that many padded tokens per forward pass.
    """

    model: Any
    """The fp32 ``transformers`` model (``eval()`` mode)."""

    def __init__(self, model_path: Path, device: str = "cpu", max_batch_tokens: int = 1) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if not (model_path / "config.json").is_file():
            raise ReferenceError(f"reference model not found: {model_path} has no config.json")
        try:
            self.model = load_fp32_model(model_path, device)
        except Exception as exc:  # noqa: BLE001 - one line for the user, not a deep traceback
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ReferenceError(f"cannot load reference model {model_path}: {first}") from None
        self.model.eval()
        self.device = device
        self.model_path = model_path
        self.max_batch_tokens = max_batch_tokens
        self.vocab_size = int(self.model.config.vocab_size)

    @classmethod
    def from_model(
        cls, model: torch.nn.Module, model_path: Path, device: str = "cpu", max_batch_tokens: int = 1
    ) -> HFReference:
        """A reference over an already-built fp32 model (e.g. a trainer's copy holding updated weights)."""
        self = cls.__new__(cls)
        self.model = model.to(device).eval()
        self.device = device
        self.model_path = model_path
        self.max_batch_tokens = max_batch_tokens
        self.vocab_size = int(self.model.config.vocab_size)
        return self

    @torch.no_grad()
    def raw_logits(self, sequences: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[torch.Tensor]:
        """fp32 logits ``[len(output), vocab]`` (on CPU) for each ``(prompt_ids, output_ids)`` pair."""
        results: list[torch.Tensor] = [torch.empty(0)] * len(sequences)
        # Longest first: a batch's padded width is the length of its first member.
        order = sorted(range(len(sequences)), key=lambda i: -self._len(sequences, i))
        batch: list[int] = []
        for index in order:
            if batch and (len(batch) + 1) * self._len(sequences, batch[0]) > self.max_batch_tokens:
                self._run(sequences, batch, results)
                batch = []
            batch.append(index)
        if batch:
            self._run(sequences, batch, results)
        return results

    @staticmethod
    def _len(sequences: Sequence[tuple[Sequence[int], Sequence[int]]], index: int) -> int:
        return len(sequences[index][0]) + len(sequences[index][1])

    def _run(
        self,
        sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
        batch: list[int],
        results: list[torch.Tensor],
    ) -> None:
        width = max(self._len(sequences, i) for i in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, index in enumerate(batch):
            tokens = list(sequences[index][0]) + list(sequences[index][1])
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
        logits = logits.float().cpu()
        for row, index in enumerate(batch):
            prompt_len, out_len = len(sequences[index][0]), len(sequences[index][1])
            results[index] = logits[row, prompt_len - 1 : prompt_len - 1 + out_len].clone()


class ReferenceCache:
    """A :class:`~conformance.trainer.Reference` that remembers the logits of the sequences it scored.

    Judging asks for the same ``(prompt, output)`` again (a batch prefetched in one forward and then
    judged case by case, a diagnosis re-judging the same samples); this serves those from memory and
    computes only the missing sequences, in one call to the wrapped reference. Bounded (least recently
    used dropped). Every other attribute is the wrapped reference's.
    """

    def __init__(self, reference: Any, capacity: int = 512) -> None:
        self.wrapped = reference
        self.capacity = capacity
        self._logits: OrderedDict[tuple[tuple[int, ...], tuple[int, ...]], torch.Tensor] = OrderedDict()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)

    @property
    def vocab_size(self) -> int:
        return int(self.wrapped.vocab_size)

    def raw_logits(self, sequences: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[torch.Tensor]:
        keys = [(tuple(int(t) for t in p), tuple(int(t) for t in o)) for p, o in sequences]
        missing = list(dict.fromkeys(k for k in keys if k not in self._logits))
        if missing:
            for key, logits in zip(missing, self.wrapped.raw_logits(missing), strict=True):
                self._logits[key] = logits
        out = []
        for key in keys:
            self._logits.move_to_end(key)
            out.append(self._logits[key])
        while len(self._logits) > self.capacity:
            self._logits.popitem(last=False)
        return out
