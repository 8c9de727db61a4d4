"""TRL's own code is the trainer: no engine, seconds.

The kit judges the engine against ``trainer_fn.trainer_logits`` read through the declared semantics
``temperature-only`` (the kit's definition: full-vocabulary ``log_softmax(logits / T)`` gathered at the
token, README "Options"). These tests prove that this is exactly what TRL 1.16's GRPOTrainer computes:
its fused-LM-head path (``add_fused_lm_head`` + ``fused_lm_head=True``, what
``_get_per_token_logps_and_entropies`` calls) and ``trl.trainer.utils.selective_log_softmax`` equal the
kit's ``temperature-only`` values on the same logits to 1e-6 (absolute, plus 1e-6 relative: fp32 spacing
near |logp| = 40 is 3.8e-6), at GRPOConfig's default temperature and at others. They also pin
framework_defaults.toml to the installed GRPOConfig.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest
import torch
import trainer_fn
import trl
from trl import GRPOConfig
from trl.trainer.utils import selective_log_softmax

from conformance.bundled import BUNDLED_MODEL

HERE = Path(__file__).resolve().parents[1]
DEFAULTS = tomllib.loads((HERE / "framework_defaults.toml").read_text())
MODEL = BUNDLED_MODEL
SEQUENCES = [([5, 17, 99, 3, 250, 61], [44, 12, 8, 300, 7, 7, 1999]), ([9, 8], [1000, 5, 2047]), ([0], [3])]
TEMPERATURES = [DEFAULTS["grpo_config"]["temperature"], 0.6, 0.7, 1.2, 0.3]


def kit_temperature_only(logits: torch.Tensor, tokens: list[int], temperature: float) -> torch.Tensor:
    """The kit's ``temperature-only`` trainer value of each token (full-vocabulary log_softmax(z / T))."""
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


def test_installed_trl_is_the_pinned_one() -> None:
    assert trl.__version__ == DEFAULTS["framework"]["version"]


def test_framework_defaults_match_grpo_config() -> None:
    fields = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
    for key, value in DEFAULTS["grpo_config"].items():
        assert fields[key] == (None if value == "None" else value), key


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_grpo_fused_head_logps_equal_the_kit_temperature_only(temperature: float) -> None:
    logits = trainer_fn.trainer_logits(SEQUENCES, MODEL)
    trl_logps = trainer_fn.grpo_per_token_logps(SEQUENCES, MODEL, temperature)
    for (_, completion), z, theirs in zip(SEQUENCES, logits, trl_logps):
        torch.testing.assert_close(theirs, kit_temperature_only(z, completion, temperature), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_selective_log_softmax_equals_the_kit_temperature_only(temperature: float) -> None:
    for (_, completion), z in zip(SEQUENCES, trainer_fn.trainer_logits(SEQUENCES, MODEL)):
        theirs = selective_log_softmax(z, torch.tensor(completion), temperature=temperature)
        torch.testing.assert_close(theirs, kit_temperature_only(z, completion, temperature), atol=1e-6, rtol=1e-6)


def test_trl_does_not_truncate_or_penalise() -> None:
    """What makes TRL's trainer temperature-only and not processed: its logprobs at T are the full-vocab
    softmax (they sum to 1 over the vocabulary, no token is masked) whatever top_p/top_k were sampled with."""
    z = trainer_fn.trainer_logits(SEQUENCES[:1], MODEL)[0]
    vocab = torch.arange(z.shape[-1]).expand(z.shape[0], -1)
    full = selective_log_softmax(z, vocab, temperature=0.7)
    torch.testing.assert_close(full.exp().sum(-1), torch.ones(z.shape[0]), atol=1e-5, rtol=0)
    assert bool(torch.isfinite(full).all())


def test_forgetting_the_temperature_is_visible_here_too() -> None:
    """The planted bug's unit-level twin: TRL's head at T=1 is not the kit's temperature-only at 0.6."""
    z = trainer_fn.trainer_logits(SEQUENCES[:1], MODEL)[0]
    forgot = trainer_fn.grpo_per_token_logps(SEQUENCES[:1], MODEL, 1.0)[0]
    assert float((forgot - kit_temperature_only(z, SEQUENCES[0][1], 0.6)).abs().max()) > 0.05
