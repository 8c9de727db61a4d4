"""verl's own code is the trainer: no engine, seconds.

The kit judges the engine against ``trainer_fn.trainer_logits`` read through the declared semantics
``temperature-only`` (the kit's definition: full-vocabulary ``log_softmax(logits / T)`` gathered at the
token, README "Options"). These tests prove that this is what verl 0.9.1's actor computes:
``_scale_logits_by_temperature`` + ``logprobs_from_logits`` (FSDPEngine's path) equal the kit's
``temperature-only`` values on the same logits to 1e-6 (absolute, plus 1e-6 relative for fp32 spacing).
They pin framework_defaults.toml to the installed verl's config files, and check that the kit's
``conformance.rl_metrics`` gives verl's own rollout-correction metrics on the same inputs.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
import trainer_fn
import verl
import yaml
from verl.trainer.ppo.rollout_corr_helper import compute_offpolicy_metrics, compute_rollout_correction_weights
from verl.utils.torch_functional import logprobs_from_logits

from conformance.bundled import BUNDLED_MODEL
from conformance.rl_metrics import pad, verl_is_metrics, verl_offpolicy_metrics

HERE = Path(__file__).resolve().parents[1]
DEFAULTS = tomllib.loads((HERE / "framework_defaults.toml").read_text())
VERL_DIR = Path(verl.__file__).parent
MODEL = BUNDLED_MODEL
SEQUENCES = [([5, 17, 99, 3, 250, 61], [44, 12, 8, 300, 7, 7, 1999]), ([9, 8], [1000, 5, 2047]), ([0], [3])]
TEMPERATURES = [DEFAULTS["rollout"]["temperature"], 0.6, 0.7, 1.2, 0.3]


def kit_temperature_only(logits: torch.Tensor, tokens: list[int], temperature: float) -> torch.Tensor:
    """The kit's ``temperature-only`` trainer value of each token (full-vocabulary log_softmax(z / T))."""
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


def _none(value: object) -> object:
    return None if value == "None" else value


def test_installed_verl_is_the_pinned_one() -> None:
    assert verl.__version__ == DEFAULTS["framework"]["version"]


def test_framework_defaults_match_verl_configs() -> None:
    rollout = yaml.safe_load((VERL_DIR / "trainer/config/rollout/rollout.yaml").read_text())
    for key, value in DEFAULTS["rollout"].items():
        assert rollout[key] == value, key
    generated = yaml.safe_load((VERL_DIR / "trainer/config/_generated_ppo_trainer.yaml").read_text())
    correction = generated["algorithm"]["rollout_correction"]
    for key, value in DEFAULTS["rollout_correction"].items():
        assert correction[key] == _none(value), key


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_verl_actor_logps_equal_the_kit_temperature_only(temperature: float) -> None:
    logits = trainer_fn.trainer_logits(SEQUENCES, MODEL)
    verl_logps = trainer_fn.verl_per_token_logps(SEQUENCES, MODEL, temperature)
    for (_, completion), z, theirs in zip(SEQUENCES, logits, verl_logps):
        torch.testing.assert_close(theirs, kit_temperature_only(z, completion, temperature), atol=1e-6, rtol=1e-6)


def test_logprobs_from_logits_is_the_full_vocabulary_log_softmax() -> None:
    z = torch.cat(trainer_fn.trainer_logits(SEQUENCES, MODEL))
    labels = torch.cat([torch.tensor(c) for _, c in SEQUENCES])
    torch.testing.assert_close(
        logprobs_from_logits(z, labels),
        torch.log_softmax(z, -1).gather(-1, labels[:, None])[:, 0],
        atol=1e-6,
        rtol=1e-6,
    )


def test_forgetting_the_temperature_is_visible_here_too() -> None:
    z = trainer_fn.trainer_logits(SEQUENCES[:1], MODEL)[0]
    forgot = trainer_fn.verl_per_token_logps(SEQUENCES[:1], MODEL, 1.0)[0]
    assert float((forgot - kit_temperature_only(z, SEQUENCES[0][1], 0.6)).abs().max()) > 0.05


def _batch(seed: int, scale: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    engine = [np.log(rng.uniform(0.02, 1.0, size=int(rng.integers(1, 20)))) for _ in range(8)]
    return [e + rng.normal(0.0, scale, size=e.size) for e in engine], engine


def _verl_inputs(
    trainer: list[np.ndarray], engine: list[np.ndarray]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t, mask = pad(trainer)
    e, _ = pad(engine)
    return (
        torch.tensor(t, dtype=torch.float64),
        torch.tensor(e, dtype=torch.float64),
        torch.tensor(mask, dtype=torch.float64),
    )


@pytest.mark.parametrize("seed,scale", [(0, 0.01), (1, 0.3), (2, 1.0)])
def test_kit_offpolicy_metrics_equal_verl(seed: int, scale: float) -> None:
    trainer, engine = _batch(seed, scale)
    old, rollout, mask = _verl_inputs(trainer, engine)
    theirs = compute_offpolicy_metrics(old_log_prob=old, rollout_log_prob=rollout, response_mask=mask)
    ours = verl_offpolicy_metrics(trainer, engine)
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("seed,scale", [(0, 0.01), (1, 0.3), (2, 1.0)])
def test_kit_is_metrics_equal_verl(level: str, seed: int, scale: float) -> None:
    trainer, engine = _batch(seed, scale)
    old, rollout, mask = _verl_inputs(trainer, engine)
    threshold = DEFAULTS["rollout_correction"]["rollout_is_threshold"]
    _, theirs = compute_rollout_correction_weights(
        log_ratio=old - rollout, response_mask=mask, rollout_is=level, rollout_is_threshold=threshold
    )
    ours = verl_is_metrics(trainer, engine, rollout_is=level, rollout_is_threshold=threshold)  # type: ignore[arg-type]
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, rel=1e-6, abs=1e-9) or (math.isnan(value) and math.isnan(ours[key])), (
            key
        )
