"""Names of logprob modes and trainer semantics (no heavy imports: the pytest plugin needs them at load).

Their meaning is defined in :mod:`conformance.contract`.
"""

from __future__ import annotations

from typing import Literal

LogprobsMode = Literal["raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits"]
LOGPROBS_MODES: tuple[LogprobsMode, ...] = (
    "raw_logprobs",
    "raw_logits",
    "processed_logprobs",
    "processed_logits",
)
TrainerSemantics = Literal["processed", "temperature-only", "raw"]
TRAINER_SEMANTICS: tuple[TrainerSemantics, ...] = ("processed", "temperature-only", "raw")
PROFILES: dict[str, int] = {"dev": 15, "ci": 100, "nightly": 500}
"""Hypothesis profiles of the suite: examples per property."""
