"""Summary metrics over compared tokens, as RL frameworks compute them.

Δ = lp_expected − lp_engine (the trainer's value minus the engine's), ρ = exp(Δ) (the importance ratio
the trainer would form). Only tokens with a finite expected and engine value enter the metrics;
boundary tokens (see :mod:`conformance.contract`) and -inf matches are counted separately by the caller.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

CLIP_EPS = 0.2
"""PPO-style clip range for :attr:`ParityMetrics.clip_fraction` (ρ outside [1-ε, 1+ε])."""


@dataclass(frozen=True)
class ParityMetrics:
    """Metrics over ``n`` compared tokens (all in nats except the probability-space ones)."""

    n: int
    mean_signed: float
    """mean Δ: the bias. A semantic bug shows as a systematic offset here."""
    std: float
    mean_abs: float
    max_abs: float
    k1_kl: float
    """mean(−Δ) (verl / OpenRLHF k1 estimator of KL(engine || trainer))."""
    k3_kl: float
    """mean(ρ − 1 − Δ) (k3 estimator, always ≥ 0)."""
    mult_prob_error: float
    """mean exp(|Δ|) (NeMo-RL's multiplicative probability error; 1 is perfect)."""
    clip_fraction: float
    """fraction of tokens with ρ outside [1 − 0.2, 1 + 0.2]."""
    prob_diff_mean: float
    """mean |exp(lp_expected) − exp(lp_engine)| (verl's probability difference)."""
    ess: float
    """effective sample size of ρ, (Σρ)² / (N Σρ²); 1 when all ratios are equal."""

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"n={self.n} meanΔ={self.mean_signed:+.3g} mean|Δ|={self.mean_abs:.3g} "
            f"max|Δ|={self.max_abs:.3g} k3={self.k3_kl:.3g} mult={self.mult_prob_error:.4f} "
            f"clip={self.clip_fraction:.3f} ess={self.ess:.3f}"
        )


def compute_metrics(expected: np.ndarray, engine: np.ndarray, clip_eps: float = CLIP_EPS) -> ParityMetrics:
    """Metrics of Δ = expected − engine over finite pairs (arrays of equal length)."""
    expected = np.asarray(expected, dtype=np.float64)
    engine = np.asarray(engine, dtype=np.float64)
    if expected.shape != engine.shape:
        raise ValueError(f"expected and engine arrays differ in shape: {expected.shape} vs {engine.shape}")
    finite = np.isfinite(expected) & np.isfinite(engine)
    delta = expected[finite] - engine[finite]
    n = int(delta.size)
    if n == 0:
        nan = math.nan
        return ParityMetrics(0, nan, nan, nan, nan, nan, nan, nan, nan, nan, nan)
    ratio = np.exp(np.clip(delta, -50, 50))
    prob_diff = np.abs(np.exp(expected[finite]) - np.exp(engine[finite]))
    return ParityMetrics(
        n=n,
        mean_signed=float(delta.mean()),
        std=float(delta.std(ddof=1)) if n > 1 else 0.0,
        mean_abs=float(np.abs(delta).mean()),
        max_abs=float(np.abs(delta).max()),
        k1_kl=float((-delta).mean()),
        k3_kl=float((ratio - 1.0 - delta).mean()),
        mult_prob_error=float(np.exp(np.abs(delta)).mean()),
        clip_fraction=float(((ratio < 1 - clip_eps) | (ratio > 1 + clip_eps)).mean()),
        prob_diff_mean=float(prob_diff.mean()),
        ess=float(ratio.sum() ** 2 / (n * (ratio**2).sum())),
    )


def bias_excess(metrics: ParityMetrics, allowed_bias: float, z: float = 4.0, noise_floor: float = 0.0) -> float:
    """How far |mean Δ| exceeds ``allowed_bias + z·σ/√n`` (≤ 0 means no significant offset).

    σ is the sample std of Δ, but at least ``noise_floor`` (the precision's known per-token noise), so
    that a handful of nearly equal Δ cannot make a tiny σ.
    """
    if metrics.n == 0:
        return -math.inf
    sigma = max(metrics.std, noise_floor)
    return abs(metrics.mean_signed) - (allowed_bias + z * sigma / math.sqrt(metrics.n))
