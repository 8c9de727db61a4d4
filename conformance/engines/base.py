"""The engine protocol: what the suite needs from an inference engine, and nothing more.

An engine is started for one :class:`~conformance.matrix.Cell`, generates completions for token-id
prompts under :class:`~conformance.spec.SamplingSpec`, reports per generated position the value of
the sampled token and of the top-n tokens (whatever its logprobs mode makes those values mean), and is
closed once. Failures of the engine itself are :class:`EngineFailure`, never a bare traceback.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

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


class EngineFailure(RuntimeError):
    """The engine crashed, hung or rejected its configuration: a finding about the engine.

    ``reason`` is one line; ``log_tail`` the last lines the engine printed, when known.
    """

    def __init__(self, reason: str, log_tail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.log_tail = log_tail

    def __str__(self) -> str:
        if self.log_tail:
            return f"{self.reason}\n--- engine log tail ---\n{self.log_tail}"
        return self.reason


@runtime_checkable
class Engine(Protocol):
    """A started engine for one cell."""

    @property
    def logprobs_mode(self) -> LogprobsMode:
        """What the engine's returned values mean (see :mod:`conformance.contract`)."""
        ...

    @property
    def description(self) -> str:
        """Engine name and version, e.g. ``vllm 0.32.0 (offline)``."""
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


@runtime_checkable
class CachingEngine(Engine, Protocol):
    """An engine with a prefix cache the suite can empty (for cold-versus-hit comparisons)."""

    def reset_prefix_cache(self) -> None:
        """Drop every cached prefix block."""
        ...
