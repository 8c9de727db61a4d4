"""The weight-update tier: a trainer stand-in, the ways weights reach a running engine, and the verdict.

Online RL pushes new weights into a running engine every step. This module holds:

* :class:`WeightSet`: named fp32 tensors in the checkpoint's (HF) names, as a trainer holds them.
* :class:`TrainerStandIn`: an fp32 HF model changed deterministically, W0 -> W1 (one real AdamW step on a
  small batch of the prompts, then seeded noise on a few chosen tensors), and references under any weights.
* :data:`UPDATE_PATHS`: every way the kit knows to push weights into vLLM, each with the reason it is
  missing from an installed version (:func:`path_unavailable`) and its push function.
* :func:`recommended_update`: **the sequence the kit documents for RL users** — push the weights, then
  ``reset_prefix_cache()`` before the next request. vLLM never resets the prefix cache by itself, so a
  prompt cached under W0 is otherwise served with W0's KV after the update.
* :func:`judge_update`: engine samples after an update against the references under W1 and W0: passes when
  the engine matches W1 within the cell's tolerance *and* is measurably far from W0; a failure is diagnosed
  as a no-op update, stale prefix-cache KV, or a partial update naming the tensor (and layer) left behind.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from conformance.spec import SamplingSpec
from conformance.engines.base import Engine, EngineFailure, Request, Sample
from conformance.parity import ParityReport, SequenceInput, Target, check_parity
from conformance.reference import HFReference
from conformance.tolerances import Tolerance
from conformance.vllm_plugin import HOST_BACKEND

WEIGHT_SYNC_LAYER = "weight-sync"
"""The layer a failed weight update is reported under."""

SEPARATION = 4.0
"""After an update the engine must be at least this many mean-|Δ| tolerances away from the W0 reference,
or W1 is not distinguishable from W0 in this cell and the check proves nothing."""


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
        from transformers import AutoModelForCausalLM

        self.model_path = model_path
        self.device = device
        self._model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device)
        self.w0 = self.weights("W0")

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
        loss = model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), labels=labels.to(self.device)).loss
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


# -- update paths ----------------------------------------------------------------------------------------


def _vllm_version() -> str:
    from conformance.engines.vllm_offline import vllm_version

    return vllm_version() or "not installed"


def _rpc(engine: Engine, what: str) -> Any:
    rpc = getattr(engine, "collective_rpc", None)
    if rpc is None:
        raise EngineFailure(f"{type(engine).__name__} has no collective_rpc: cannot push weights via {what}")
    return rpc


def _push_reload_iterator(engine: Engine, weights: WeightSet, workdir: Path) -> None:
    items = weights.items()

    def reload_weights_iterator(worker: Any) -> None:
        worker.reload_weights(weights_iterator=iter(items))

    _rpc(engine, "reload_weights")(reload_weights_iterator)


def _push_reload_path(engine: Engine, weights: WeightSet, workdir: Path) -> None:
    reload = getattr(engine, "reload_weights_from_path", None)
    if reload is None:
        raise EngineFailure(f"{type(engine).__name__} has no reload_weights_from_path")
    reload(weights.save(workdir / weights.label.replace(" ", "_")))


def _push_load_weights(engine: Engine, weights: WeightSet, workdir: Path) -> None:
    items = weights.items()

    def model_load_weights(worker: Any) -> None:
        worker.model_runner.model.load_weights(items)

    _rpc(engine, "model.load_weights")(model_load_weights)


def _worker_lacks(attribute: str) -> str | None:
    try:
        from vllm.v1.worker.gpu_worker import Worker
    except Exception as exc:  # noqa: BLE001 - any import problem means the path is unavailable
        return f"vllm {_vllm_version()}: cannot import the V1 worker ({type(exc).__name__})"
    if not hasattr(Worker, attribute):
        return f"vllm {_vllm_version()}: the V1 worker has no {attribute}"
    return None


def _weight_transfer_unavailable(backend: str) -> Callable[[Engine], str | None]:
    def reason(engine: Engine) -> str | None:
        try:
            from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory  # noqa: F401
        except ImportError:
            return f"vllm {_vllm_version()} has no weight-transfer API (vllm.distributed.weight_transfer)"
        if not hasattr(engine, "init_weight_transfer_engine"):
            return f"{type(engine).__name__} does not drive the weight-transfer API (no init_weight_transfer_engine)"
        cell = getattr(engine, "cell", None)
        if backend == HOST_BACKEND:
            from conformance.vllm_plugin import installed

            if not installed():
                return (
                    f"the kit's vLLM plugin (entry point group 'vllm.general_plugins') is not installed, so vLLM "
                    f"cannot find the {HOST_BACKEND!r} backend: pip install the kit"
                )
        elif not torch.cuda.is_available():
            return f"weight-transfer backend {backend!r} needs CUDA (torch.cuda.is_available() is False)"
        elif backend != "ipc":
            return (
                f"weight-transfer backend {backend!r} needs a trainer process group beside the engine; the kit "
                f"drives only 'ipc' (same GPU, same host) and {HOST_BACKEND!r}"
            )
        elif not hasattr(engine, "llm"):
            return f"{type(engine).__name__}: CUDA IPC handles are sent to an offline vllm.LLM only"
        configured = ((getattr(cell, "extra_engine_kwargs", None) or {}).get("weight_transfer_config") or {}).get("backend")
        if configured != backend:
            return (
                f"cell {getattr(cell, 'id', '?')} does not start vLLM with weight_transfer_config backend {backend!r} "
                f"(engine_kwargs = {{ weight_transfer_config = {{ backend = \"{backend}\" }} }})"
            )
        return None

    return reason


def _push_weight_transfer_host(engine: Engine, weights: WeightSet, workdir: Path) -> None:
    """init_weight_transfer_engine / start_weight_update / update_weights (two chunks) / finish_weight_update
    with the kit's host-memory backend: the engine adapter is the control-plane client (offline: ``vllm.LLM``'s
    methods; server: its RL routes)."""
    from conformance.engines.host_transfer import send_weights

    send_weights(engine, weights.items(), workdir / "transfer")  # type: ignore[arg-type]


def _push_weight_transfer_ipc(engine: Engine, weights: WeightSet, workdir: Path) -> None:
    """init_weight_transfer_engine / start_weight_update / update_weights / finish_weight_update over CUDA IPC
    (the trainer's tensors stay on its GPU; vLLM's own trainer-side helper makes the handles)."""
    from dataclasses import asdict

    from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferEngine

    llm = engine.llm  # type: ignore[attr-defined]
    tensors = [(n, t.to("cuda")) for n, t in weights.items()]
    try:
        llm.init_weight_transfer_engine({"init_info": {}})
        llm.start_weight_update()
        IPCWeightTransferEngine.trainer_send_weights(
            iter(tensors), {"send_mode": lambda info: llm.update_weights({"update_info": asdict(info)})}
        )
        llm.finish_weight_update()
    except Exception as exc:  # noqa: BLE001 - a failure of the engine's update path is a finding
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise EngineFailure(f"weight transfer over ipc failed: {type(exc).__name__}: {first[:300]}") from None
    finally:
        del tensors
        torch.cuda.synchronize()


@dataclass(frozen=True)
class UpdatePath:
    """One way to push weights into a running engine."""

    name: str
    description: str
    push: Callable[[Engine, WeightSet, Path], None]
    unavailable: Callable[[Engine], str | None]
    """Why the path cannot run with this engine and vLLM version (None: it can)."""


def _needs_method(method: str) -> Callable[[Engine], str | None]:
    def reason(engine: Engine) -> str | None:
        if not hasattr(engine, method):
            return f"{type(engine).__name__} has no {method}"
        return _worker_lacks("reload_weights")

    return reason


UPDATE_PATHS: dict[str, UpdatePath] = {
    p.name: p
    for p in (
        UpdatePath(
            "reload-iterator",
            "collective_rpc -> worker.reload_weights(weights_iterator=...) (tensors sent to the engine process)",
            _push_reload_iterator,
            _needs_method("collective_rpc"),
        ),
        UpdatePath(
            "reload-path",
            "worker.reload_weights(weights_path=DIR) from a safetensors checkpoint the trainer wrote "
            "(offline: collective_rpc; server: POST /collective_rpc in VLLM_SERVER_DEV_MODE)",
            _push_reload_path,
            _needs_method("reload_weights_from_path"),
        ),
        UpdatePath(
            "load-weights",
            "collective_rpc -> worker.model_runner.model.load_weights(weights) (what many RL frameworks call)",
            _push_load_weights,
            lambda engine: None if hasattr(engine, "collective_rpc") else f"{type(engine).__name__} has no collective_rpc",
        ),
        UpdatePath(
            "weight-transfer-host",
            "init_weight_transfer_engine / start_weight_update / update_weights / finish_weight_update, the kit's "
            "host-memory backend (runs without CUDA; the API, update session and layerwise reload are vLLM's)",
            _push_weight_transfer_host,
            _weight_transfer_unavailable(HOST_BACKEND),
        ),
        UpdatePath(
            "weight-transfer-ipc",
            "init_weight_transfer_engine / start_weight_update / update_weights / finish_weight_update, CUDA IPC",
            _push_weight_transfer_ipc,
            _weight_transfer_unavailable("ipc"),
        ),
        UpdatePath(
            "weight-transfer-nccl",
            "init_weight_transfer_engine / start_weight_update / update_weights / finish_weight_update, NCCL",
            lambda engine, weights, workdir: None,
            _weight_transfer_unavailable("nccl"),
        ),
    )
}


def path_unavailable(path: UpdatePath, engine: Engine) -> str | None:
    """Why ``path`` cannot run on ``engine`` (the skip reason), or None."""
    return path.unavailable(engine)


def default_path(engine: Engine) -> UpdatePath:
    """The first update path this engine supports (reload from tensors, else from a checkpoint directory)."""
    for name in ("reload-iterator", "reload-path"):
        if path_unavailable(UPDATE_PATHS[name], engine) is None:
            return UPDATE_PATHS[name]
    raise EngineFailure(f"{type(engine).__name__}: no weight-update path is available (needs collective_rpc or reload_weights_from_path)")


def recommended_update(engine: Engine, path: UpdatePath, weights: WeightSet, workdir: Path | None = None) -> None:
    """The update sequence the kit documents for RL users.

    1. Make sure no request is in flight (an offline ``LLM.generate`` call has returned; a server has
       answered every request sent before the update).
    2. Push the full weight set through ``path``.
    3. ``reset_prefix_cache()``: vLLM does not drop KV computed under the old weights by itself.
    """
    with tempfile.TemporaryDirectory(prefix="parity-weights-") as tmp:
        path.push(engine, weights, workdir or Path(tmp))
    reset = getattr(engine, "reset_prefix_cache", None)
    if reset is not None:
        reset()


# -- the verdict -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeSet:
    """Requests that probe an update: the same requests before (to fill the prefix cache) and after."""

    requests: tuple[Request, ...]

    @classmethod
    def default(cls, prompts: Sequence[Sequence[int]], long_prompt: Sequence[int], max_tokens: int = 16) -> ProbeSet:
        """Greedy decoding of a long prompt (several KV blocks, so a cache hit is real) and short prompts."""
        spec = SamplingSpec(temperature=0.0, max_tokens=max_tokens, logprobs=1)
        return cls(tuple(Request(tuple(p), spec) for p in [long_prompt, *prompts]))


def training_batch(prompts: Sequence[Sequence[int]], count: int = 4) -> list[tuple[int, ...]]:
    """The trainer stand-in's batch: the first ``count`` prompts (token ids)."""
    return [tuple(p) for p in prompts[:count]]


def long_prompt(prompts: Sequence[Sequence[int]], length: int = 320) -> tuple[int, ...]:
    """A prompt of ``length`` tokens (prompts 8, 9, 10 joined, BOS kept once): several KV blocks on any tier."""
    first, *rest = [tuple(prompts[i]) for i in (8, 9, 10)]
    joined = first + tuple(t for p in rest for t in p[1:])
    if len(joined) < length:
        raise ValueError(f"prompts 8-10 give {len(joined)} tokens, fewer than the {length} a long probe needs")
    return joined[:length]


def default_probes(prompts: Sequence[Sequence[int]]) -> ProbeSet:
    """The tier's probe set over a prompt set's ids: the long prompt plus prompts 0 and 12, greedy."""
    return ProbeSet.default([prompts[0], prompts[12]], long_prompt(prompts))


def head_dtype(engine: Engine) -> str:
    """The dtype the engine computes the lm_head projection in, read in the worker.

    vLLM keeps the lm_head weight in the model dtype and applies ``head_dtype`` in its logits processor
    (activations and weight cast for the projection), so that attribute is what is read; a model without
    one reports its lm_head weight's dtype.
    """

    def read_head_dtype(worker: Any) -> str:
        model = worker.model_runner.model
        dtype = getattr(getattr(model, "logits_processor", None), "head_dtype", None)
        return str(dtype if dtype is not None else model.lm_head.weight.dtype)

    return str(_rpc(engine, "lm_head dtype")(read_head_dtype)[0]).replace("torch.", "")


@dataclass
class UpdateReport:
    """Engine values after an update against the references under the new (W1) and old (W0) weights."""

    cell: str
    path: str
    to_new: ParityReport
    distance_new: float
    distance_old: float
    required_separation: float
    passed: bool
    diagnosis: str = ""
    cached_sequences: int = 0
    layer: str | None = None
    candidates: dict[str, float] = field(default_factory=dict)

    def explain(self) -> str:
        verdict = "passed" if self.passed else f"FAILED [layer: {self.layer}]"
        lines = [
            f"weight update via {self.path!r} {verdict} in cell {self.cell!r}",
            (
                f"  mean |Δ| to the reference under the pushed weights (W1): {self.distance_new:.3g} "
                f"(cell tolerance {self.to_new.tolerance.mean_abs:g}; check {'passed' if self.to_new.passed else 'failed'})"
            ),
            (
                f"  mean |Δ| to the reference under the previous weights (W0): {self.distance_old:.3g} "
                f"(must be >= {self.required_separation:.3g})"
            ),
            f"  sequences served partly from the prefix cache: {self.cached_sequences}",
        ]
        if self.diagnosis:
            lines.append(f"  diagnosis: {self.diagnosis}")
        if self.candidates:
            best = sorted(self.candidates.items(), key=lambda kv: kv[1])[:3]
            lines.append("  closest single-tensor-stale states: " + ", ".join(f"{n}: {d:.3g}" for n, d in best))
        if not self.to_new.passed:
            lines.append("  check against W1:")
            lines += ["    " + line for line in self.to_new.explain().splitlines()]
        return "\n".join(lines)


def _judge(
    requests: Sequence[Request],
    samples: Sequence[Sequence[Sample]],
    contexts: Sequence[Any],
    reference: HFReference,
    target: Target,
    tolerance: Tolerance,
    cell: str,
    only: Callable[[Sample], bool] = lambda s: True,
) -> ParityReport | None:
    flat = [(r, c, s) for r, c, group in zip(requests, contexts, samples) for s in group if only(s)]
    if not flat:
        return None
    logits = reference.raw_logits([(s.prompt_ids, s.output_ids) for _, _, s in flat])
    inputs = [SequenceInput(s, lg, c) for (_, c, s), lg in zip(flat, logits)]
    return check_parity(inputs, flat[0][0].spec, target, tolerance, cell)


def judge_update(
    requests: Sequence[Request],
    samples: Sequence[Sequence[Sample]],
    contexts: Sequence[Any],
    trainer: TrainerStandIn,
    new: WeightSet,
    old: WeightSet,
    target: Target,
    tolerance: Tolerance,
    cell: str,
    path: str,
    new_reference: HFReference | None = None,
    old_reference: HFReference | None = None,
    engine: Engine | None = None,
) -> UpdateReport:
    """Judge samples taken after pushing ``new`` into an engine that held ``old``.

    Passes iff the values match ``new`` within ``tolerance`` (the full :func:`check_parity` verdict) and
    their mean |Δ| (distance to the legitimate range) to ``old`` is at least :data:`SEPARATION` mean-|Δ|
    tolerances. On failure the diagnosis says which of these the engine serves: ``old`` entirely (no-op
    update), ``new`` except for sequences served from the prefix cache (stale KV), or ``new`` with one tensor
    left at ``old`` (partial update; the tensor and its layer are named). When no such state matches and
    ``engine`` is given, its hidden states are compared with ``new``'s module by module
    (:mod:`conformance.hidden_states`) and the first module that diverges is named.
    """
    ref_new = new_reference or trainer.reference(new)
    ref_old = old_reference or trainer.reference(old)
    to_new = _judge(requests, samples, contexts, ref_new, target, tolerance, cell)
    to_old = _judge(requests, samples, contexts, ref_old, target, tolerance, cell)
    assert to_new is not None and to_old is not None, "no samples to judge"
    separation = SEPARATION * to_new.tolerance.mean_abs
    cached = sum(1 for group in samples for s in group if (s.cached_tokens or 0) > 0)
    report = UpdateReport(
        cell=cell,
        path=path,
        to_new=to_new,
        distance_new=to_new.residual.mean_abs,
        distance_old=to_old.residual.mean_abs,
        required_separation=separation,
        passed=to_new.passed and to_old.residual.mean_abs >= separation,
        cached_sequences=cached,
    )
    if report.passed and to_new.tolerance.mean_abs >= COARSE_MEAN_ABS:
        found = _scan_partial(
            report, requests, samples, contexts, trainer, new, old, target, tolerance, cell,
            closer_than=CLOSER_FACTOR * report.distance_new,
        )
        if found:
            report.passed, report.layer, report.diagnosis = False, WEIGHT_SYNC_LAYER, found
        return report
    if report.passed:
        return report
    report.layer = WEIGHT_SYNC_LAYER
    if to_new.passed:
        report.diagnosis = (
            f"the engine matches W1 but W1 is within {SEPARATION:g} tolerances of W0 in this cell: the update "
            f"is too small to prove it arrived (make the trainer stand-in's step larger)"
        )
        return report
    if to_old.passed:
        report.diagnosis = "the engine still serves W0 everywhere: the update did not reach the model (a no-op update)"
        return report
    if cached:
        uncached = _judge(requests, samples, contexts, ref_new, target, tolerance, cell, only=lambda s: not (s.cached_tokens or 0))
        hits = _judge(requests, samples, contexts, ref_new, target, tolerance, cell, only=lambda s: bool(s.cached_tokens))
        if hits is not None and not hits.passed and (uncached is None or uncached.passed):
            report.diagnosis = (
                f"stale prefix cache: the {cached} sequence(s) served from the prefix cache are off "
                f"(mean |Δ| {hits.residual.mean_abs:.3g}) while the others match W1: KV computed under W0 was "
                f"reused; call reset_prefix_cache() after every weight update"
            )
            return report
    found = _scan_partial(report, requests, samples, contexts, trainer, new, old, target, tolerance, cell)
    if found is None and engine is not None:
        prompt = min((r.prompt_ids for r in requests), key=len)
        found = _localize(engine, ref_new.model, new, prompt, coarse=to_new.tolerance.mean_abs >= COARSE_MEAN_ABS)
    report.diagnosis = found or NO_STATE_MATCHES
    return report


NO_STATE_MATCHES = "the engine matches neither W1, nor W0, nor W1 with any single tensor or fused group left at W0 or zeroed"
"""The diagnosis when no modelled weight state explains the engine (the hidden states may say more)."""


def _localize(engine: Engine, model: torch.nn.Module, new: WeightSet, prompt: Sequence[int], coarse: bool) -> str | None:
    """The diagnosis from the first module whose hidden states leave ``new``'s (None: not capturable)."""
    from conformance.hidden_states import first_divergence

    divergence = first_divergence(engine, model, prompt, coarse)
    if divergence is None:
        return None
    if divergence.first is None:
        return f"{NO_STATE_MATCHES}; {divergence.explain()}"
    tensors = [n.removeprefix(divergence.first + ".") for n in new.tensors if n.startswith(divergence.first + ".")]
    return (
        f"{NO_STATE_MATCHES}; {divergence.explain()}: {layer_of(divergence.first + '.weight')} did not take W1 "
        f"intact (its tensors: {', '.join(tensors) or 'none changed'}; a partial or corrupt update of that module)"
    )


def _partial_states(new: WeightSet, old: WeightSet) -> list[tuple[WeightSet, str]]:
    """The engine states a partial push can leave: each changed tensor at W0 or zeroed, each fused group at W0."""
    states: list[tuple[WeightSet, str]] = []
    changed = new.changed_from(old)
    for name in changed:
        states.append((new.with_tensor_from(old, name), f"{name} ({layer_of(name)}) still at W0"))
        zeroed = WeightSet(f"{new.label} with {name} zeroed", {**new.tensors, name: torch.zeros_like(new.tensors[name])})
        states.append((zeroed, f"{name} ({layer_of(name)}) zeroed"))
    for group in fused_groups(changed):
        stale = WeightSet(f"{new.label} with {', '.join(group)} at W0", {**new.tensors, **{n: old.tensors[n] for n in group}})
        states.append((stale, f"the fused group {', '.join(group)} ({layer_of(group[0])}) still at W0 (vLLM loads them into one parameter)"))
    return states


def _scan_partial(
    report: UpdateReport,
    requests: Sequence[Request],
    samples: Sequence[Sequence[Sample]],
    contexts: Sequence[Any],
    trainer: TrainerStandIn,
    new: WeightSet,
    old: WeightSet,
    target: Target,
    tolerance: Tolerance,
    cell: str,
    closer_than: float | None = None,
) -> str | None:
    """Judge the samples against every partial-update state; fill ``report.candidates``.

    Returns the diagnosis for the first state the samples match within tolerance, or, with ``closer_than``,
    for the closest state whose mean |Δ| is below ``closer_than`` (a coarse cell, where W1 itself passes).
    """
    best: tuple[float, str] | None = None
    for state, how in _partial_states(new, old):
        judged = _judge(requests, samples, contexts, trainer.reference(state), target, tolerance, cell)
        assert judged is not None
        distance = judged.residual.mean_abs
        report.candidates[how] = distance
        if closer_than is None and judged.passed:
            return f"partial update: the engine matches W1 with {how} (mean |Δ| {distance:.3g}): that tensor did not reach the engine"
        if closer_than is not None and distance < closer_than and (best is None or distance < best[0]):
            best = (distance, how)
    if best is None:
        return None
    return (
        f"partial update: the engine is closer to W1 with {best[1]} (mean |Δ| {best[0]:.3g}) than to W1 itself "
        f"(mean |Δ| {report.distance_new:.3g}), though W1 is within this cell's tolerance: that tensor did not reach "
        f"the engine"
    )


COARSE_MEAN_ABS = 1e-3
"""Cells whose mean-|Δ| tolerance is at least this (bf16) cannot see a one-tensor omission in the W1 check
alone, so :func:`judge_update` always scans the partial-update states there."""

CLOSER_FACTOR = 0.5
"""In a coarse cell, a partial-update state at most this fraction of the distance to W1 fails the update."""


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
