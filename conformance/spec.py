"""What a request asks for, in the engine-agnostic words of the contract: torch-free on purpose.

The engine protocol, the hypothesis strategies, the goldens, the server's request mapping and the pytest
plugin all need these types at import time; none of them should pay for torch. What the parameters
*mean* is :mod:`conformance.contract` (which imports torch); this module only names them:

* :class:`SamplingSpec`: every sampling parameter the contract knows, as a user passes it;
* :data:`SHAPING_FIELDS` / :data:`TRUNCATION_FIELDS`: the parameters of contract steps 1-5 and 8-10,
  written once here (the contract, the objective check, the alternatives and the ablation read them);
* :class:`TokenContext`: what the processors of one sequence see besides the logits;
* the names of logprobs modes and trainer semantics.

A new sampling parameter is: a contract step (:mod:`conformance.contract`), a field here (with its
default and its group), a strategy (:mod:`conformance.strategies`) and its brute-force test.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

LogprobsMode = Literal["raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits"]
LOGPROBS_MODES: tuple[LogprobsMode, ...] = ("raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits")
TrainerSemantics = Literal["processed", "temperature-only", "raw"]
TRAINER_SEMANTICS: tuple[TrainerSemantics, ...] = ("processed", "temperature-only", "raw")


def trainer_semantics(name: str) -> TrainerSemantics:
    """``name`` as a trainer semantics (one of :data:`TRAINER_SEMANTICS`); ``ValueError`` naming them otherwise."""
    for semantics in TRAINER_SEMANTICS:
        if semantics == name:
            return semantics
    raise ValueError(f"trainer semantics {name!r}: expected one of {', '.join(TRAINER_SEMANTICS)}")


MIN_TEMPERATURE = 1e-2
"""Temperatures in (0, MIN_TEMPERATURE) are clamped up to it (vLLM ``_MAX_TEMP``); only T == 0 is greedy."""

SHAPING_FIELDS: tuple[str, ...] = (
    "allowed_token_ids",
    "bad_words",
    "min_tokens",
    "logit_bias",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
)
"""Parameters of contract steps 1-5 (masks, bias, penalties): they reshape the distribution."""

TRUNCATION_FIELDS: tuple[str, ...] = ("min_p", "top_k", "top_p")
"""Parameters of contract steps 8-10: they remove tokens (never for greedy: vLLM resets them)."""


@dataclass(frozen=True)
class SamplingSpec:
    """Engine-agnostic sampling parameters, as a user passes them (before vLLM's normalisation).

    Field names and defaults follow ``vllm.SamplingParams``. ``top_k <= 0`` means no top-k.
    ``logprobs`` is the number of top logprobs requested besides the sampled token's.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    allowed_token_ids: tuple[int, ...] | None = None
    bad_words: tuple[str, ...] = ()
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    max_tokens: int = 16
    n: int = 1
    seed: int | None = None
    logprobs: int = 0

    @property
    def greedy(self) -> bool:
        """Greedy iff T is 0: vLLM clamps 0 < T < 0.01 to 0.01 before testing ``T < 1e-5``."""
        return self.temperature <= 0.0

    @property
    def effective_temperature(self) -> float:
        """The temperature the sampler divides by (1.0 for greedy, clamped below at 0.01)."""
        if self.greedy:
            return 1.0
        return max(self.temperature, MIN_TEMPERATURE)

    @property
    def truncates(self) -> bool:
        """Whether min_p / top_k / top_p remove tokens (never for greedy: vLLM resets them)."""
        return not self.greedy and bool(self.truncation_fields())

    @property
    def reshapes(self) -> bool:
        """Whether steps 1-5 (masks, bias, penalties) can change the distribution."""
        return bool(self.shaping_fields())

    def non_default(self, names: Sequence[str] | None = None) -> list[str]:
        """Which of ``names`` differ from their default (``top_k <= 0`` counts as the default)."""
        out = []
        for name in REQUEST_FIELDS if names is None else names:
            value = getattr(self, name)
            if name == "top_k" and value <= 0:
                continue
            if value != _DEFAULTS[name]:
                out.append(name)
        return out

    def shaping_fields(self) -> list[str]:
        """The set parameters of steps 1-5, by name."""
        return self.non_default(SHAPING_FIELDS)

    def truncation_fields(self) -> list[str]:
        """The set parameters of steps 8-10, by name."""
        return self.non_default(TRUNCATION_FIELDS)

    def reset(self, *names: str) -> SamplingSpec:
        """A copy with ``names`` back at their defaults."""
        return dataclasses.replace(self, **{n: _DEFAULTS[n] for n in names})

    def to_kwargs(self, *, every_field: bool = False) -> dict[str, object]:
        """Keyword arguments for ``vllm.SamplingParams`` (JSON-ready: lists, ``logit_bias`` a dict).

        Only non-default fields (a copy-pasteable reproduction), or with ``every_field`` all of them (a
        request body that does not rely on the receiver's defaults)."""
        out: dict[str, object] = {}
        for name in REQUEST_FIELDS:
            value = getattr(self, name)
            if not every_field and value == _DEFAULTS[name]:
                continue
            if name == "logit_bias":
                value = {int(t): float(b) for t, b in value}
            elif isinstance(value, tuple):
                value = list(value)
            out[name] = value
        return out

    def describe(self) -> str:
        """Minimal ``SamplingSpec(...)`` text naming only the non-default fields."""
        parts = [f"{k}={v!r}" for k, v in self.to_kwargs().items()]
        return "SamplingSpec(" + ", ".join(parts) + ")"


REQUEST_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(SamplingSpec))
"""Every field, in the order requests and reproductions list them."""
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(SamplingSpec)}
assert set(SHAPING_FIELDS + TRUNCATION_FIELDS) <= set(REQUEST_FIELDS)


@dataclass(frozen=True)
class TokenContext:
    """What the processors of one sequence see besides the logits.

    ``stop_token_ids`` are the engine's stop tokens for min_tokens (EOS, even with ``ignore_eos``, plus
    the request's ``stop_token_ids``); ``bad_words_token_ids`` are the bad words as the engine tokenised them.
    """

    prompt_ids: Sequence[int]
    stop_token_ids: frozenset[int] = frozenset()
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()
