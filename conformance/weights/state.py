"""Weights as a trainer holds them, and the trainer stand-in that changes them deterministically.

* :class:`WeightSet`: named fp32 tensors in the checkpoint's (HF) names, and the partial states a broken
  push can leave (one tensor at the old weights, a fused group left behind).
* :class:`TrainerStandIn`: an fp32 HF model changed deterministically, W0 -> W1 (one real AdamW step on a
  small batch of the prompts, then seeded noise on a few chosen tensors), and references under any weights.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from conformance.reference import HFReference, load_fp32_model


@dataclass(frozen=True)
class WeightSet:
    """Named fp32 tensors (checkpoint names, CPU) and a label for messages."""

    label: str
    tensors: dict[str, torch.Tensor]

    def items(self) -> list[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` pairs, the form vLLM's ``load_weights`` / ``reload_weights`` take."""
        return list(self.tensors.items())

    def changed_from(self, other: WeightSet) -> list[str]:
        """Names whose tensors differ from ``other``'s."""
        return [n for n, t in self.tensors.items() if n in other.tensors and not torch.equal(t, other.tensors[n])]

    def without(self, name: str) -> WeightSet:
        """The same set with ``name`` left out (a partial push)."""
        if name not in self.tensors:
            raise KeyError(f"{self.label} has no tensor {name!r}")
        return WeightSet(f"{self.label} without {name}", {n: t for n, t in self.tensors.items() if n != name})

    def with_tensor_from(self, other: WeightSet, name: str) -> WeightSet:
        """This set with ``name`` taken from ``other`` (the state an engine is in after a partial push)."""
        return WeightSet(f"{self.label} with {name} at {other.label}", {**self.tensors, name: other.tensors[name]})

    def save(self, directory: Path) -> Path:
        """Write the tensors as one safetensors checkpoint file in ``directory`` (made if needed)."""
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        save_file({n: t.contiguous() for n, t in self.tensors.items()}, str(directory / "model.safetensors"))
        return directory


def layer_of(name: str) -> str:
    """The module a tensor belongs to, for messages: ``model.layers.2.mlp.down_proj.weight`` -> ``layer 2 (mlp.down_proj)``."""
    match = re.match(r".*layers\.(\d+)\.(.+)\.(weight|bias)$", name)
    if match:
        return f"layer {match.group(1)} ({match.group(2)})"
    return name.rsplit(".", 1)[0]


class TrainerStandIn:
    """The trainer's fp32 copy of the model: W0 as loaded, W1 after a deterministic training step.

    ``step()`` runs one AdamW step (``lr``) of next-token loss on ``batch`` token sequences, then adds seeded
    Gaussian noise (``noise_scale`` times each tensor's std) to ``noise_tensors`` (the ones present), so W1
    differs from W0 in every tensor and clearly in a few. Deterministic for a given seed.
    """

    NOISE_TENSORS = ("model.layers.1.mlp.down_proj.weight", "model.layers.3.self_attn.o_proj.weight", "lm_head.weight")

    def __init__(self, model_path: Path, device: str = "cpu") -> None:
        self.model_path = model_path
        self.device = device
        self._model = load_fp32_model(model_path, device)
        self.w0 = self.weights("W0")

    @property
    def config(self) -> Any:
        """The model's HF config (head counts for the per-rank shard rules, :mod:`conformance.weights.shards`)."""
        return self._model.config

    def weights(self, label: str) -> WeightSet:
        """The model's current parameters (cloned, CPU)."""
        return WeightSet(label, {n: p.detach().cpu().clone() for n, p in self._model.named_parameters()})

    def load(self, weights: WeightSet) -> None:
        """Set the trainer model's parameters to ``weights`` (names it lacks are an error)."""
        params = dict(self._model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights.tensors.items():
                params[name].copy_(tensor.to(params[name].device))

    def step(
        self,
        batch: Sequence[Sequence[int]],
        seed: int = 1234,
        lr: float = 1e-3,
        noise_scale: float = 0.3,
        noise_tensors: Iterable[str] | None = None,
        label: str = "W1",
    ) -> WeightSet:
        """W0 -> W1: one AdamW step on ``batch`` then seeded noise; the trainer model is left at W0."""
        self.load(self.w0)
        torch.manual_seed(seed)
        model = self._model
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        width = max(len(s) for s in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(list(seq))
            labels[row, : len(seq)] = torch.tensor(list(seq))
            mask[row, : len(seq)] = 1
        loss = model(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device), labels=labels.to(self.device)
        ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.eval()
        generator = torch.Generator().manual_seed(seed)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name in noise_tensors if noise_tensors is not None else self.NOISE_TENSORS:
                if name in params:
                    p = params[name]
                    noise = torch.randn(p.shape, generator=generator) * noise_scale * float(p.std())
                    p.add_(noise.to(p.device))
        w1 = self.weights(label)
        self.load(self.w0)
        return w1

    def reference(self, weights: WeightSet) -> HFReference:
        """An fp32 reference whose model carries ``weights`` (a fresh copy; the trainer model is untouched)."""
        import copy

        model = copy.deepcopy(self._model)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights.tensors.items():
                params[name].copy_(tensor.to(params[name].device))
        return HFReference.from_model(model, self.model_path, device=self.device)


FUSED_PARTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Checkpoint tensors vLLM loads into one fused parameter (qkv_proj, gate_up_proj)."""


def fused_groups(names: Sequence[str]) -> list[tuple[str, ...]]:
    """Groups of ``names`` that vLLM fuses into one parameter (e.g. a layer's q/k/v projections)."""
    present = set(names)
    groups = []
    for name in names:
        for parts in FUSED_PARTS:
            head = f".{parts[0]}."
            if head in name:
                group = tuple(name.replace(head, f".{p}.") for p in parts)
                if all(g in present for g in group):
                    groups.append(group)
    return groups
