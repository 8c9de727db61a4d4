"""The per-rank shard rules and verdict without an engine (conformance/weights/shards.py).

Synthetic read-backs are built the way a TP engine's ranks hold their shards: each rank's slice of a weight
state cut by :func:`expected_shards` and digested in the shard's dtype. The statuses (OK / STALE / PARTIAL)
and the named shards must follow what each rank holds. The real-engine side (reading through the packed CPU
GEMM, pushes that skip a rank) is tests/test_selftest_tp.py.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from conformance.weights.shards import OK, PARTIAL, STALE, _digest_bytes, diagnose_ranks, expected_shards, rank_mixture
from conformance.weights.state import WeightSet

CONFIG = SimpleNamespace(num_attention_heads=4, num_key_value_heads=2)
HIDDEN, INTER, VOCAB, HEAD = 16, 24, 100, 4  # vocab 100: padded to 128 (two blocks of 64)
VLLM_NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.qkv_proj.weight",
    "model.layers.0.self_attn.o_proj.weight",
    "model.layers.0.mlp.gate_up_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.0.input_layernorm.weight",
    "model.norm.weight",
    "lm_head.weight",
]


def _state(seed: int, label: str) -> WeightSet:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    kv = CONFIG.num_key_value_heads * HEAD
    return WeightSet(
        label,
        {
            "model.embed_tokens.weight": r(VOCAB, HIDDEN),
            "model.layers.0.self_attn.q_proj.weight": r(HIDDEN, HIDDEN),
            "model.layers.0.self_attn.k_proj.weight": r(kv, HIDDEN),
            "model.layers.0.self_attn.v_proj.weight": r(kv, HIDDEN),
            "model.layers.0.self_attn.o_proj.weight": r(HIDDEN, HIDDEN),
            "model.layers.0.mlp.gate_proj.weight": r(INTER, HIDDEN),
            "model.layers.0.mlp.up_proj.weight": r(INTER, HIDDEN),
            "model.layers.0.mlp.down_proj.weight": r(HIDDEN, INTER),
            "model.layers.0.input_layernorm.weight": torch.ones(HIDDEN),
            "model.norm.weight": torch.ones(HIDDEN),
            "lm_head.weight": r(VOCAB, HIDDEN),
        },
    )


W0, W1 = _state(0, "W0"), _state(1, "W1")


def _shard(shards: dict[str, torch.Tensor | None], name: str) -> torch.Tensor:
    """``shards[name]``, a parameter the rules model (expected_shards gives None for one they do not)."""
    t = shards[name]
    assert t is not None, name
    return t


def _readback(per_rank: list[WeightSet], dtype: torch.dtype = torch.float32) -> list[dict[str, Any]]:
    """What shard_digests would return from a TP engine whose rank r holds ``per_rank[r]``."""
    out = []
    for rank, state in enumerate(per_rank):
        shards = expected_shards(state.tensors, CONFIG, rank, len(per_rank), VLLM_NAMES)
        params = {}
        for name, t in shards.items():
            assert t is not None, name
            t = t.to(dtype)
            params[name] = (tuple(t.shape), str(dtype).removeprefix("torch."), _digest_bytes(t), "parameter")
        out.append(
            {"rank": rank, "tp_rank": rank, "tp_size": len(per_rank), "pp_rank": 0, "pp_size": 1, "params": params}
        )
    return out


def test_shard_shapes_follow_vllm_rules() -> None:
    shards = expected_shards(W1.tensors, CONFIG, 1, 2, VLLM_NAMES)
    q, k = HIDDEN // 2, CONFIG.num_key_value_heads * HEAD // 2
    assert _shard(shards, "model.layers.0.self_attn.qkv_proj.weight").shape == (q + 2 * k, HIDDEN)
    assert torch.equal(
        _shard(shards, "model.layers.0.self_attn.qkv_proj.weight")[:q],
        W1.tensors["model.layers.0.self_attn.q_proj.weight"][q:],
    )
    assert _shard(shards, "model.layers.0.mlp.gate_up_proj.weight").shape == (INTER, HIDDEN)
    assert torch.equal(
        _shard(shards, "model.layers.0.mlp.down_proj.weight"),
        W1.tensors["model.layers.0.mlp.down_proj.weight"][:, INTER // 2 :],
    )
    lm = _shard(shards, "lm_head.weight")  # rows 64..127 of the padded vocabulary: 36 real rows, 28 zero padding rows
    assert lm.shape == (64, HIDDEN) and torch.equal(lm[:36], W1.tensors["lm_head.weight"][64:]) and not lm[36:].any()
    assert torch.equal(_shard(shards, "model.norm.weight"), W1.tensors["model.norm.weight"])  # replicated


def test_rank_mixture_is_what_the_ranks_hold() -> None:
    """rank_mixture cuts where expected_shards cuts: rank r of the mixture holds rank r's slice of its state."""
    mix = rank_mixture([W1.tensors, W0.tensors], CONFIG)
    for rank, state in enumerate((W1, W0)):
        got = expected_shards(mix, CONFIG, rank, 2, VLLM_NAMES)
        want = expected_shards(state.tensors, CONFIG, rank, 2, VLLM_NAMES)
        for name in VLLM_NAMES:
            assert torch.equal(_shard(got, name), _shard(want, name)), (rank, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_rank_at_w1_is_ok(dtype: torch.dtype) -> None:
    check = diagnose_ranks(_readback([W1, W1], dtype), W1, W0, CONFIG)
    assert check.passed and [r.status for r in check.ranks] == [OK, OK], check.explain()
    assert all(r.changed == len(VLLM_NAMES) - 2 and r.compared == len(VLLM_NAMES) for r in check.ranks), check.explain()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rank_that_missed_the_push_is_stale_and_named(dtype: torch.dtype) -> None:
    check = diagnose_ranks(_readback([W1, W0], dtype), W1, W0, CONFIG)
    assert not check.passed and [r.status for r in check.ranks] == [OK, STALE], check.explain()
    assert check.diagnosis().startswith(
        "per-rank read-back: rank 1 (tp_rank 1/2): STALE, none of its 6 changed shards"
    ), check.diagnosis()


def test_one_tensor_missed_on_one_rank_is_partial_and_named() -> None:
    one = "model.layers.0.mlp.down_proj.weight"
    check = diagnose_ranks(_readback([W1, W1.with_tensor_from(W0, one)]), W1, W0, CONFIG)
    assert [r.status for r in check.ranks] == [OK, PARTIAL] and check.ranks[1].off == ((one, "W0"),), check.explain()
    assert f"PARTIAL, 1 of 8 shards not at W1: {one} holds W0" in check.diagnosis()


def test_half_loaded_fused_parameter_holds_neither_state() -> None:
    """q_proj at W1 but k/v at W0 in one rank's qkv_proj: neither state, named with the tensors it loads from."""
    q = "model.layers.0.self_attn.q_proj.weight"
    partial = WeightSet("mixed", {**W0.tensors, q: W1.tensors[q]})
    torn = WeightSet(
        "torn",
        {
            **W1.tensors,
            **{n: partial.tensors[n] for n in (q.replace("q_proj", "k_proj"), q.replace("q_proj", "v_proj"))},
        },
    )
    check = diagnose_ranks(_readback([W1, torn]), W1, W0, CONFIG)
    assert [r.status for r in check.ranks] == [OK, PARTIAL], check.explain()
    assert "qkv_proj.weight [from model.layers.0.self_attn.q_proj.weight, " in check.diagnosis()
    assert "holds neither W1 nor W0" in check.diagnosis()


def test_unchanged_tensors_prove_nothing_and_refits_pass() -> None:
    """Pushing W0 again (new is old): nothing changed, every shard equal to W0 passes; a shard that drifted fails."""
    assert diagnose_ranks(_readback([W0, W0]), W0, W0, CONFIG).passed
    drifted = diagnose_ranks(_readback([W0, W1.with_tensor_from(W0, "lm_head.weight")]), W0, W0, CONFIG)
    assert not drifted.passed and drifted.ranks[1].status == PARTIAL, drifted.explain()


def test_unmodelled_parameters_are_left_out_not_failed() -> None:
    readback = _readback([W1, W1])
    for rank in readback:
        rank["params"]["model.layers.0.mlp.experts.w13_weight"] = ((4,), "float32", "0" * 16, "parameter")
    check = diagnose_ranks(readback, W1, W0, CONFIG)
    assert check.passed and all(r.unmodelled == 1 for r in check.ranks), check.explain()
