"""Summary metrics on hand-computed arrays, and the bias test's separation of offset from noise."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conformance.metrics import CLIP_EPS, bias_excess, compute_metrics

LN2 = math.log(2.0)


def test_hand_computed_metrics() -> None:
    # Δ = expected - engine = [0, 0, ln 2]  ->  ρ = [1, 1, 2]
    expected = np.array([-1.0, -2.0, -0.5 + LN2])
    engine = np.array([-1.0, -2.0, -0.5])
    m = compute_metrics(expected, engine)
    assert m.n == 3
    assert m.mean_signed == pytest.approx(LN2 / 3)
    assert m.k1_kl == pytest.approx(-LN2 / 3)
    assert m.mean_abs == pytest.approx(LN2 / 3)
    assert m.max_abs == pytest.approx(LN2)
    # sample std (ddof=1) of [0, 0, ln2]: mean ln2/3, squares (ln2/3)^2 * (1 + 1 + 4) / 2
    assert m.std == pytest.approx(math.sqrt(6 * (LN2 / 3) ** 2 / 2))
    assert m.k3_kl == pytest.approx((2 - 1 - LN2) / 3)  # mean(ρ - 1 - Δ)
    assert m.mult_prob_error == pytest.approx((1 + 1 + 2) / 3)  # mean exp|Δ|
    assert m.clip_fraction == pytest.approx(1 / 3)  # ρ = 2 is outside [0.8, 1.2]
    assert m.ess == pytest.approx((1 + 1 + 2) ** 2 / (3 * (1 + 1 + 4)))  # 8/9
    prob = abs(math.exp(-0.5 + LN2) - math.exp(-0.5))
    assert m.prob_diff_mean == pytest.approx(prob / 3)


def test_negative_offsets_and_clip_boundary() -> None:
    # Δ = [-0.1, 0, 0.2]: ρ = [0.905, 1, 1.221]; only 1.221 > 1 + 0.2
    expected = np.array([0.0, -1.0, -2.0])
    engine = expected - np.array([-0.1, 0.0, 0.2])
    m = compute_metrics(expected, engine)
    assert m.mean_signed == pytest.approx(0.1 / 3)
    assert m.mean_abs == pytest.approx(0.1)
    assert m.max_abs == pytest.approx(0.2)
    assert m.clip_fraction == pytest.approx(1 / 3)
    rho = [math.exp(-0.1), 1.0, math.exp(0.2)]
    assert m.k3_kl == pytest.approx(sum(r - 1 - math.log(r) for r in rho) / 3)
    assert m.mult_prob_error == pytest.approx((math.exp(0.1) + 1 + math.exp(0.2)) / 3)
    assert m.ess == pytest.approx(sum(rho) ** 2 / (3 * sum(r * r for r in rho)))
    assert CLIP_EPS == 0.2
    wide = compute_metrics(expected, engine, clip_eps=0.3)
    assert wide.clip_fraction == 0.0


def test_perfect_match() -> None:
    values = np.array([-0.1, -3.0, -7.5])
    m = compute_metrics(values, values.copy())
    assert (m.mean_signed, m.mean_abs, m.max_abs, m.k1_kl, m.k3_kl, m.std) == (0, 0, 0, 0, 0, 0)
    assert m.mult_prob_error == 1.0 and m.clip_fraction == 0.0 and m.ess == pytest.approx(1.0)


def test_non_finite_pairs_are_ignored() -> None:
    expected = np.array([-1.0, -np.inf, -2.0, np.nan, -3.0, -0.5, -np.inf])
    engine = np.array([-1.5, -1.0, -2.0, -1.0, np.inf, -np.inf, -np.inf])
    m = compute_metrics(expected, engine)
    assert m.n == 2
    assert m.mean_signed == pytest.approx(0.25)
    assert m.max_abs == pytest.approx(0.5)
    assert all(math.isfinite(v) for v in m.as_dict().values())


def test_empty_and_all_non_finite() -> None:
    m = compute_metrics(np.array([-np.inf, np.nan]), np.array([-np.inf, 0.0]))
    assert m.n == 0
    assert math.isnan(m.mean_signed) and math.isnan(m.max_abs)
    assert bias_excess(m, 0.01) == -math.inf
    assert compute_metrics(np.array([]), np.array([])).n == 0


def test_single_token_std_is_zero() -> None:
    m = compute_metrics(np.array([-1.0]), np.array([-1.25]))
    assert m.n == 1 and m.std == 0.0 and m.mean_signed == pytest.approx(0.25)


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="shape"):
        compute_metrics(np.zeros(3), np.zeros(4))


def test_summary_mentions_every_headline_metric() -> None:
    text = compute_metrics(np.array([0.0, -1.0]), np.array([0.1, -1.0])).summary()
    for key in ("n=2", "meanΔ=", "mean|Δ|=", "max|Δ|=", "k3=", "mult=", "clip=", "ess="):
        assert key in text


def test_bias_excess_separates_offset_from_noise() -> None:
    rng = np.random.default_rng(7)
    expected = rng.normal(-2.0, 1.0, size=200)
    noise = rng.normal(0.0, 0.01, size=200)
    offset = compute_metrics(expected, expected - 0.1 - noise)  # Δ = 0.1 + noise
    pure = compute_metrics(expected, expected - noise)  # Δ = noise
    assert offset.mean_signed == pytest.approx(0.1, abs=0.005)
    assert bias_excess(offset, 0.02) > 0
    assert bias_excess(pure, 0.02) < 0
    assert bias_excess(pure, 0.0) < 0  # noise alone is not an offset even with no allowed bias
    # the negative offset is caught as well
    assert bias_excess(compute_metrics(expected, expected + 0.1 + noise), 0.02) > 0
    # exact value: |mean| - (allowed + 4 σ / √n)
    want = abs(offset.mean_signed) - (0.02 + 4 * offset.std / math.sqrt(200))
    assert bias_excess(offset, 0.02) == pytest.approx(want)


def test_bias_excess_noise_floor() -> None:
    # 10 tokens with a tiny but nearly constant Δ: σ ≈ 0 makes any offset "significant" unless floored
    expected = np.zeros(10)
    engine = -np.full(10, 1e-3) - np.linspace(0, 1e-6, 10)
    m = compute_metrics(expected, engine)
    assert bias_excess(m, 0.0) > 0
    assert bias_excess(m, 0.0, noise_floor=0.01) < 0
    assert bias_excess(m, 0.0, noise_floor=0.01) == pytest.approx(abs(m.mean_signed) - 4 * 0.01 / math.sqrt(10))
