"""Unit tests of the per-module hidden-state comparison (no engine): the first module above the threshold is
named, NaN activations count as diverged, and a clean comparison names none."""

from __future__ import annotations

import torch

from conformance.weights.hidden_states import FP32_THRESHOLD, MODULES, compare

NAMES = [
    "model.embed_tokens",
    "model.layers.0.self_attn",
    "model.layers.0.mlp",
    "model.layers.1.self_attn",
    "model.norm",
]


def _states(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(6, 8, generator=gen) for name in NAMES}


def test_compared_module_names() -> None:
    assert all(MODULES.match(n) for n in NAMES)
    assert not MODULES.match("model.layers.0.self_attn.qkv_proj") and not MODULES.match("lm_head")


def test_clean_states_name_no_module() -> None:
    ref = _states()
    got = {n: t * (1 + 1e-6) for n, t in ref.items()}
    divergence = compare(got, ref, FP32_THRESHOLD)
    assert divergence.first is None and len(divergence.errors) == len(NAMES)
    assert "after the final norm" in divergence.explain()


def test_first_diverging_module_is_named() -> None:
    ref = _states()
    got = dict(ref)
    got["model.layers.1.self_attn"] = ref["model.layers.1.self_attn"] + 0.1  # and everything after it
    got["model.norm"] = ref["model.norm"] * 3
    divergence = compare(got, ref, FP32_THRESHOLD)
    assert divergence.first == "model.layers.1.self_attn", divergence.explain()
    assert "model.layers.1.self_attn (relative error" in divergence.explain()


def test_nan_activations_diverge() -> None:
    ref = _states()
    got = dict(ref)
    got["model.layers.0.mlp"] = torch.full_like(ref["model.layers.0.mlp"], float("nan"))
    divergence = compare(got, ref, FP32_THRESHOLD)
    assert divergence.first == "model.layers.0.mlp" and dict(divergence.errors)["model.layers.0.mlp"] == float("inf")


def test_modules_missing_on_one_side_are_skipped() -> None:
    ref = _states()
    got = {n: t for n, t in ref.items() if n != "model.layers.0.mlp"}
    assert [n for n, _ in compare(got, ref, FP32_THRESHOLD).errors] == [n for n in NAMES if n != "model.layers.0.mlp"]


def test_gradual_drift_names_no_module() -> None:
    """Errors that grow layer by layer past the threshold (precision noise) blame no single module."""
    ref = _states()
    got = {n: t * (1 + 0.002 * i) for i, (n, t) in enumerate(ref.items())}  # 0, 0.002, ..., 0.008
    divergence = compare(got, ref, FP32_THRESHOLD)
    assert max(e for _, e in divergence.errors) > FP32_THRESHOLD and divergence.first is None, divergence.explain()
    assert "gradually" in divergence.explain()
