"""The importance-sampling diagnostics RL frameworks log, computed from the kit's Δ.

Every function takes the same two inputs: per sequence, the trainer's log-probabilities of the sampled
tokens and the engine's (ragged: one 1-D array per sequence, equal lengths pairwise). The difference the
frameworks form is Δ = logp_trainer − logp_engine, the log of the importance ratio ρ = π_train / π_rollout
(TRL: ``old_per_token_logps − sampling_per_token_logps``; verl: ``old_log_prob − rollout_log_prob``;
NeMo-RL: ``prev_logprobs`` vs ``generation_logprobs``), i.e. the kit's Δ = expected − engine
(:mod:`conformance.metrics`).

Each formula below restates the framework's code, with its source file and the version read:

* :func:`trl_sampling_metrics`: TRL 1.16.0, ``trl/trainer/grpo_trainer.py``
  (``GRPOTrainer._generate_and_score_completions``: the vLLM importance-sampling correction and its
  ``sampling/sampling_logp_difference/*`` and ``sampling/importance_sampling_ratio/*`` metrics). TRL has no
  function for these (the code is inline in the trainer), so no test can call TRL's own.
* :func:`verl_rollout_corr_metrics`: verl 0.9.1, ``verl/trainer/ppo/rollout_corr_helper.py``
  (``compute_offpolicy_metrics``, ``compute_rollout_correction_weights``, ``compute_is_metrics``: the
  ``rollout_corr/*`` metrics). Truncated IS (a float threshold) only; IcePop's ``"lower_upper"`` strings
  are not modelled.
* :func:`nemo_rl_token_mult_prob_error`: NeMo-RL, ``nemo_rl/algorithms/loss_functions.py``
  (``ClippedPGLossFn``: ``token_mult_prob_error``), gated by NeMo-RL's test suites at
  ``max(train/token_mult_prob_error) < 1.05`` (:data:`NEMO_RL_MULT_PROB_ERROR_GATE`).

numpy only (no torch import), float64 throughout. The verl functions mirror verl's ``masked_mean``, which
divides by ``count + 1e-8`` (a one-token sequence's mean is off by 1e-8 relative: visible in a 1e-6
comparison of small deviations); the TRL and NeMo-RL ones divide by the count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

TrlISMode = Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]
VerlISLevel = Literal["token", "sequence"]

TRL_DEFAULT_IS_MODE: TrlISMode = "sequence_mask"
"""``GRPOConfig.vllm_importance_sampling_mode`` default (TRL 1.16.0)."""
TRL_DEFAULT_CLIP_MAX = 3.0
"""``GRPOConfig.vllm_importance_sampling_clip_max`` default (TRL 1.16.0; ``clip_min`` defaults to None)."""
VERL_DEFAULT_IS_THRESHOLD = 2.0
"""``rollout_is_threshold`` default of verl's ``compute_rollout_correction_and_add_to_batch`` (0.9.1)."""
VERL_SAFETY_BOUND = 20.0
"""verl's ``SAFETY_BOUND``: log-ratios are clamped to ±20 before ``exp``."""
NEMO_RL_MULT_PROB_ERROR_GATE = 1.05
"""NeMo-RL's test suites require ``max(train/token_mult_prob_error) < 1.05``."""


def pad(sequences: Sequence[ArrayLike], fill: float = 0.0) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """Ragged per-sequence values -> ``(values [B, T], mask [B, T])``, right-padded with ``fill``.

    The layout the frameworks use (a response mask over padded rows); ``T`` is the longest sequence.
    """
    rows = [np.asarray(s, dtype=np.float64).reshape(-1) for s in sequences]
    width = max((r.size for r in rows), default=0)
    values = np.full((len(rows), width), fill, dtype=np.float64)
    mask = np.zeros((len(rows), width), dtype=bool)
    for i, r in enumerate(rows):
        values[i, : r.size] = r
        mask[i, : r.size] = True
    return values, mask


def _paired(
    trainer: Sequence[ArrayLike], engine: Sequence[ArrayLike]
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.bool_]]:
    if len(trainer) != len(engine):
        raise ValueError(f"trainer and engine hold {len(trainer)} and {len(engine)} sequences")
    for i, (t, e) in enumerate(zip(trainer, engine)):
        if np.asarray(t).size != np.asarray(e).size:
            raise ValueError(f"sequence {i}: {np.asarray(t).size} trainer values vs {np.asarray(e).size} engine values")
    t_pad, mask = pad(trainer)
    e_pad, _ = pad(engine)
    if not mask.any():
        raise ValueError("no tokens: every sequence is empty")
    return t_pad, e_pad, mask


VERL_MASKED_MEAN_EPS = 1e-8
"""verl's ``masked_mean`` divides by ``mask.sum() + 1e-8`` (``verl/utils/torch_functional.py``)."""


def _masked_mean(
    values: NDArray[np.float64], mask: NDArray[np.bool_], axis: int | None = None, eps: float = 0.0
) -> NDArray[np.float64] | float:
    """Mean of ``values`` where ``mask``; ``eps`` is added to the count (verl: 1e-8, NeMo-RL / TRL: 0)."""
    total = np.where(mask, values, 0.0).sum(axis=axis)
    count = mask.sum(axis=axis)
    if axis is None:
        return float(total / (count + eps))
    return np.asarray(total / (np.maximum(count, 1) if eps == 0.0 else count + eps), dtype=np.float64)


def _verl_mean(
    values: NDArray[np.float64], mask: NDArray[np.bool_], axis: int | None = None
) -> NDArray[np.float64] | float:
    return _masked_mean(values, mask, axis, VERL_MASKED_MEAN_EPS)


# --------------------------------------------------------------------------------------------------- TRL


@dataclass(frozen=True)
class TrlSamplingMetrics:
    """What TRL's GRPOTrainer logs for the vLLM importance-sampling correction (plus the cap fractions).

    Logged by TRL: ``sampling/sampling_logp_difference/{mean,max}`` (``logp_diff_mean``/``_max``) and
    ``sampling/importance_sampling_ratio/{min,mean,max}`` (``is_min``/``is_mean``/``is_max``: of the ratio
    *after* truncation or masking, as TRL logs them). Not logged by TRL (its issue #5231 asks for them):
    the raw ratio's max and the fraction of ratios beyond the bounds, ``frac_over_cap`` (> ``clip_max``) and
    ``frac_under_min`` (< ``clip_min``), over tokens (token modes) or sequences (sequence modes).
    """

    mode: str
    clip_max: float | None
    clip_min: float | None
    n_tokens: int
    n_ratios: int
    logp_diff_mean: float
    logp_diff_max: float
    is_min: float
    is_mean: float
    is_max: float
    raw_is_max: float
    frac_over_cap: float
    frac_under_min: float

    def as_dict(self) -> dict[str, float | str | None]:
        return asdict(self)


def trl_sampling_metrics(
    trainer: Sequence[ArrayLike],
    engine: Sequence[ArrayLike],
    mode: TrlISMode = TRL_DEFAULT_IS_MODE,
    clip_max: float | None = TRL_DEFAULT_CLIP_MAX,
    clip_min: float | None = None,
) -> TrlSamplingMetrics:
    """TRL 1.16.0's vLLM importance-sampling correction metrics (``trl/trainer/grpo_trainer.py``).

    With Δ_t = logp_trainer − logp_engine over each sequence's completion tokens (a NaN Δ, a token vLLM
    could not score, counts as 0, i.e. ratio 1):

    * logp difference: ``mean |Δ_t|`` and ``max |Δ_t|`` over the tokens whose Δ is not NaN;
    * ratio: token modes ρ_t = exp(Δ_t); sequence modes ρ_s = exp(Σ_t Δ_t) (the product of the token
      ratios: TRL sums, it does not average);
    * ``*_truncate``: ρ ← clamp(ρ, clip_min, clip_max); ``*_mask``: ρ ← 0 where ρ < clip_min or ρ > clip_max
      (a None bound is no bound);
    * ``is_min / is_mean / is_max``: of the processed ratios (per token in token modes, per sequence in
      sequence modes), as logged; ``frac_over_cap`` / ``frac_under_min`` and ``raw_is_max``: of the raw ρ.
    """
    if mode not in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"):
        raise ValueError(f"unknown TRL importance sampling mode {mode!r}")
    t, e, mask = _paired(trainer, engine)
    diff = np.where(mask, t - e, 0.0)
    finite_diff = np.abs(diff[mask & ~np.isnan(diff)])
    diff = np.nan_to_num(diff, nan=0.0, posinf=np.inf, neginf=-np.inf)
    sequence_level = mode.startswith("sequence")
    log_ratio = diff.sum(axis=-1) if sequence_level else diff[mask]
    with np.errstate(over="ignore"):
        raw = np.exp(log_ratio)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    if mode.endswith("truncate"):
        processed = np.clip(raw, low, high)
    else:
        processed = np.where((raw < low) | (raw > high), 0.0, raw)
    return TrlSamplingMetrics(
        mode=mode,
        clip_max=clip_max,
        clip_min=clip_min,
        n_tokens=int(mask.sum()),
        n_ratios=int(raw.size),
        logp_diff_mean=float(finite_diff.mean()) if finite_diff.size else 0.0,
        logp_diff_max=float(finite_diff.max()) if finite_diff.size else 0.0,
        is_min=float(processed.min()),
        is_mean=float(processed.mean()),
        is_max=float(processed.max()),
        raw_is_max=float(raw.max()),
        frac_over_cap=float((raw > high).mean()),
        frac_under_min=float((raw < low).mean()),
    )


# -------------------------------------------------------------------------------------------------- verl


@dataclass(frozen=True)
class VerlRolloutCorrMetrics:
    """verl's ``rollout_corr/*`` metrics (names without the prefix), for truncated IS at one level.

    Off-policy diagnostics (``compute_offpolicy_metrics``): ``kl``, ``k3_kl``, ``training_ppl``,
    ``training_log_ppl``, ``rollout_ppl``, ``rollout_log_ppl``, ``log_ppl_diff``, ``log_ppl_abs_diff``,
    ``log_ppl_diff_max``, ``log_ppl_diff_min``, ``ppl_ratio``, ``chi2_token``, ``chi2_seq``.
    IS weights (``compute_is_metrics``): ``rollout_is_mean``, ``rollout_is_max``, ``rollout_is_min``,
    ``rollout_is_std``, ``rollout_is_eff_sample_size``, ``rollout_is_ratio_fraction_high`` / ``_low`` and
    the per-sequence ``rollout_is_seq_*`` statistics.
    """

    rollout_is: str
    rollout_is_threshold: float
    kl: float
    k3_kl: float
    training_ppl: float
    training_log_ppl: float
    rollout_ppl: float
    rollout_log_ppl: float
    log_ppl_diff: float
    log_ppl_abs_diff: float
    log_ppl_diff_max: float
    log_ppl_diff_min: float
    ppl_ratio: float
    chi2_token: float
    chi2_seq: float
    rollout_is_mean: float
    rollout_is_max: float
    rollout_is_min: float
    rollout_is_std: float
    rollout_is_eff_sample_size: float
    rollout_is_ratio_fraction_high: float
    rollout_is_ratio_fraction_low: float
    rollout_is_seq_mean: float
    rollout_is_seq_std: float
    rollout_is_seq_max: float
    rollout_is_seq_min: float
    rollout_is_seq_max_deviation: float
    rollout_is_seq_fraction_high: float
    rollout_is_seq_fraction_low: float

    def as_dict(self) -> dict[str, float | str]:
        return asdict(self)

    def prefixed(self) -> dict[str, float]:
        """The numeric fields as verl logs them (``rollout_corr/<name>``)."""
        return {
            f"rollout_corr/{k}": v
            for k, v in asdict(self).items()
            if isinstance(v, float) and k != "rollout_is_threshold"
        }


def verl_offpolicy_metrics(trainer: Sequence[ArrayLike], engine: Sequence[ArrayLike]) -> dict[str, float]:
    """verl 0.9.1 ``compute_offpolicy_metrics(old_log_prob=trainer, rollout_log_prob=engine, mask)``.

    Means are over all tokens of the batch unless "per sequence" (ℓ_s = mean_t of a sequence's logps):

    * ``kl`` = mean(logp_engine − logp_trainer) = mean(−Δ); ``k3_kl`` = mean(exp(Δ) − Δ − 1);
    * ``training_ppl`` = mean_s exp(−ℓ_s^train), ``training_log_ppl`` = mean_s(−ℓ_s^train); same for rollout;
    * per sequence d_s = ℓ_s^rollout − ℓ_s^train: ``log_ppl_diff`` = mean_s d_s, ``log_ppl_abs_diff`` =
      mean_s |d_s|, ``log_ppl_diff_max/min``, ``ppl_ratio`` = mean_s exp(d_s);
    * ``chi2_token`` = mean(exp(clamp(Δ, ±20))²) − 1; ``chi2_seq`` = mean_s exp(2·clamp(Σ_t Δ, ±20)) − 1.
    """
    t, e, mask = _paired(trainer, engine)
    delta = np.where(mask, t - e, 0.0)
    seq_train = np.asarray(_verl_mean(t, mask, axis=-1))
    seq_roll = np.asarray(_verl_mean(e, mask, axis=-1))
    d = seq_roll - seq_train
    rho = np.exp(np.clip(delta, -VERL_SAFETY_BOUND, VERL_SAFETY_BOUND))
    seq_sum = np.clip(delta.sum(axis=-1), -VERL_SAFETY_BOUND, VERL_SAFETY_BOUND)
    return {
        "kl": float(_verl_mean(-delta, mask)),
        "k3_kl": float(_verl_mean(np.exp(delta) - delta - 1.0, mask)),
        "training_ppl": float(np.exp(-seq_train).mean()),
        "training_log_ppl": float((-seq_train).mean()),
        "rollout_ppl": float(np.exp(-seq_roll).mean()),
        "rollout_log_ppl": float((-seq_roll).mean()),
        "log_ppl_diff": float(d.mean()),
        "log_ppl_abs_diff": float(np.abs(d).mean()),
        "log_ppl_diff_max": float(d.max()),
        "log_ppl_diff_min": float(d.min()),
        "ppl_ratio": float(np.exp(d).mean()),
        "chi2_token": float(_verl_mean(rho**2, mask)) - 1.0,
        "chi2_seq": float(np.exp(2.0 * seq_sum).mean()) - 1.0,
    }


def verl_is_metrics(
    trainer: Sequence[ArrayLike],
    engine: Sequence[ArrayLike],
    rollout_is: VerlISLevel = "token",
    rollout_is_threshold: float = VERL_DEFAULT_IS_THRESHOLD,
) -> dict[str, float]:
    """verl 0.9.1 ``compute_rollout_correction_weights(log_ratio=Δ, mask, rollout_is, threshold)`` metrics,
    truncated IS (TIS: a single float upper bound ``C``, lower bound 1/C for the fractions).

    Raw weights: token level w_t = exp(clamp(Δ_t, ±20)); sequence level w_t = exp(clamp(Σ_t Δ_t, ±20)) for
    every token of the sequence. Truncated weights w̃ = min(w, C). Over the masked tokens:

    * ``rollout_is_mean`` = mean w̃; ``rollout_is_std`` = sqrt(max(mean w̃² − (mean w̃)², 0));
    * ``rollout_is_eff_sample_size`` = 1 / mean((w̃ / mean w̃)²) = (mean w̃)² / mean w̃² (the kit's ESS
      formula, on truncated weights);
    * token level: ``rollout_is_max/min`` of w̃, ``rollout_is_ratio_fraction_high/low`` = fraction of raw
      w > C / w < 1/C; sequence level: max/min = exp(max/min of Σ_t Δ_t) (max clamped at 20 in log space),
      fractions over sequences of Σ_t Δ_t > log C / < −log C;
    * per sequence m_s = mean_t w̃: ``rollout_is_seq_mean/std/max/min`` (std with Bessel's correction),
      ``rollout_is_seq_max_deviation`` = max |m_s − 1|, ``rollout_is_seq_fraction_high/low`` = fraction of
      sequences whose mean *raw* weight is > C / < 1/C.
    """
    if rollout_is not in ("token", "sequence"):
        raise ValueError(f"unknown verl rollout_is level {rollout_is!r}")
    t, e, mask = _paired(trainer, engine)
    delta = np.where(mask, t - e, 0.0)
    upper = float(rollout_is_threshold)
    lower = 1.0 / upper
    out: dict[str, float] = {}
    if rollout_is == "token":
        raw = np.exp(np.clip(delta, -VERL_SAFETY_BOUND, VERL_SAFETY_BOUND)) * mask
    else:
        seq_log = delta.sum(axis=-1)
        raw = (
            np.broadcast_to(np.exp(np.clip(seq_log, -VERL_SAFETY_BOUND, VERL_SAFETY_BOUND))[:, None], delta.shape)
            * mask
        )
    weights = np.minimum(raw, upper)
    out["rollout_is_mean"] = float(_verl_mean(weights, mask))
    if rollout_is == "sequence":
        out["rollout_is_max"] = float(np.exp(min(float(seq_log.max()), VERL_SAFETY_BOUND)))
        out["rollout_is_min"] = float(np.exp(float(seq_log.min())))
        out["rollout_is_ratio_fraction_high"] = float((seq_log > math.log(upper)).mean())
        out["rollout_is_ratio_fraction_low"] = float((seq_log < math.log(lower)).mean())
    else:
        out["rollout_is_ratio_fraction_high"] = float(_verl_mean((raw > upper).astype(float), mask))
        out["rollout_is_ratio_fraction_low"] = float(_verl_mean((raw < lower).astype(float), mask))
        out["rollout_is_max"] = float(weights[mask].max())
        out["rollout_is_min"] = float(weights[mask].min())
    clamped = np.clip(weights, 0.0, upper)
    mean_c = _verl_mean(clamped, mask)
    if mask.sum() > 1:
        out["rollout_is_std"] = math.sqrt(max(float(_verl_mean(clamped**2, mask)) - float(mean_c) ** 2, 0.0))
    else:
        out["rollout_is_std"] = 0.0
    normalized = clamped / (float(mean_c) + 1e-8)
    out["rollout_is_eff_sample_size"] = 1.0 / float(_verl_mean(normalized**2, mask))
    seq_mean = np.asarray(_verl_mean(weights, mask, axis=-1))
    out["rollout_is_seq_mean"] = float(seq_mean.mean())
    out["rollout_is_seq_std"] = float(seq_mean.std(ddof=1)) if seq_mean.size > 1 else 0.0
    out["rollout_is_seq_max"] = float(seq_mean.max())
    out["rollout_is_seq_min"] = float(seq_mean.min())
    out["rollout_is_seq_max_deviation"] = float(np.abs(seq_mean - 1.0).max())
    raw_seq_mean = np.asarray(_verl_mean(raw, mask, axis=-1))
    out["rollout_is_seq_fraction_high"] = float((raw_seq_mean > upper).mean())
    out["rollout_is_seq_fraction_low"] = float((raw_seq_mean < lower).mean())
    return out


def verl_rollout_corr_metrics(
    trainer: Sequence[ArrayLike],
    engine: Sequence[ArrayLike],
    rollout_is: VerlISLevel = "token",
    rollout_is_threshold: float = VERL_DEFAULT_IS_THRESHOLD,
) -> VerlRolloutCorrMetrics:
    """verl's ``rollout_corr/*`` metrics: :func:`verl_offpolicy_metrics` plus :func:`verl_is_metrics`
    (what ``compute_rollout_correction_and_rejection_mask`` logs with ``rollout_is`` set, no rejection)."""
    values = verl_offpolicy_metrics(trainer, engine)
    values.update(verl_is_metrics(trainer, engine, rollout_is, rollout_is_threshold))
    return VerlRolloutCorrMetrics(rollout_is=rollout_is, rollout_is_threshold=float(rollout_is_threshold), **values)


# ----------------------------------------------------------------------------------------------- NeMo-RL


def nemo_rl_token_mult_prob_error(trainer: Sequence[ArrayLike], engine: Sequence[ArrayLike]) -> float:
    """NeMo-RL's ``token_mult_prob_error`` = mean over tokens of exp(|logp_generation − logp_train|).

    ``ClippedPGLossFn`` computes ``masked_mean(exp(|generation_logprobs − prev_logprobs| * mask), mask)``;
    1 is perfect agreement; NeMo-RL's test suites gate it at < :data:`NEMO_RL_MULT_PROB_ERROR_GATE` (1.05).
    The same value as :attr:`conformance.metrics.ParityMetrics.mult_prob_error` over the same tokens.
    """
    t, e, mask = _paired(trainer, engine)
    return float(_masked_mean(np.exp(np.abs(np.where(mask, t - e, 0.0))), mask))


def nemo_rl_gate_passes(mult_prob_error: float, gate: float = NEMO_RL_MULT_PROB_ERROR_GATE) -> bool:
    """Whether NeMo-RL's CI gate (``token_mult_prob_error < 1.05``) would pass."""
    return mult_prob_error < gate


# ----------------------------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class RLFrameworkMetrics:
    """One row of framework-facing numbers for a set of compared sequences (the report's columns)."""

    n_tokens: int
    n_sequences: int
    trl: TrlSamplingMetrics
    verl: VerlRolloutCorrMetrics
    nemo_rl_mult_prob_error: float
    nemo_rl_gate_passes: bool

    def columns(self) -> dict[str, float]:
        """The short per-cell columns: TRL's IS max and the fraction over its cap, verl's chi² and ESS,
        the log-ppl gap, NeMo-RL's error."""
        return {
            "trl_is_max": self.trl.is_max,
            "trl_frac_over_cap": self.trl.frac_over_cap,
            "verl_k3": self.verl.k3_kl,
            "verl_chi2_token": self.verl.chi2_token,
            "verl_chi2_seq": self.verl.chi2_seq,
            "verl_log_ppl_abs_diff": self.verl.log_ppl_abs_diff,
            "verl_is_ess": self.verl.rollout_is_eff_sample_size,
            "nemo_mult_prob_error": self.nemo_rl_mult_prob_error,
        }

    def summary(self) -> str:
        """One line: ``TRL IS[sequence_mask, cap 3] min/mean/max ... | verl ... | NeMo-RL ...``."""
        trl, verl = self.trl, self.verl
        cap = "none" if trl.clip_max is None else f"{trl.clip_max:g}"
        gate = "passes" if self.nemo_rl_gate_passes else "FAILS"
        return (
            f"TRL {trl.mode} (cap {cap}): |Δ| mean {trl.logp_diff_mean:.3g} max {trl.logp_diff_max:.3g}, "
            f"IS min/mean/max {trl.is_min:.3g}/{trl.is_mean:.3g}/{trl.is_max:.3g}, over cap {trl.frac_over_cap:.1%} | "
            f"verl k3 {verl.k3_kl:.3g} chi2 token/seq {verl.chi2_token:.3g}/{verl.chi2_seq:.3g} "
            f"log-ppl |diff| {verl.log_ppl_abs_diff:.3g} IS ESS {verl.rollout_is_eff_sample_size:.3f} | "
            f"NeMo-RL mult prob error {self.nemo_rl_mult_prob_error:.4f} ({gate} the {NEMO_RL_MULT_PROB_ERROR_GATE} gate)"
        )


def rl_framework_metrics(
    trainer: Sequence[ArrayLike],
    engine: Sequence[ArrayLike],
    trl_mode: TrlISMode = TRL_DEFAULT_IS_MODE,
    trl_clip_max: float | None = TRL_DEFAULT_CLIP_MAX,
    trl_clip_min: float | None = None,
    verl_level: VerlISLevel = "token",
    verl_threshold: float = VERL_DEFAULT_IS_THRESHOLD,
) -> RLFrameworkMetrics:
    """All three frameworks' diagnostics over the same per-sequence sampled-token logprobs (defaults:
    each framework's own defaults)."""
    mult = nemo_rl_token_mult_prob_error(trainer, engine)
    return RLFrameworkMetrics(
        n_tokens=int(sum(np.asarray(s).size for s in trainer)),
        n_sequences=len(trainer),
        trl=trl_sampling_metrics(trainer, engine, trl_mode, trl_clip_max, trl_clip_min),
        verl=verl_rollout_corr_metrics(trainer, engine, verl_level, verl_threshold),
        nemo_rl_mult_prob_error=mult,
        nemo_rl_gate_passes=nemo_rl_gate_passes(mult),
    )
