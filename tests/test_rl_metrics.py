"""conformance.rl_metrics: the IS diagnostics of TRL, verl and NeMo-RL from the kit's Δ.

Hand-computed cases, closed forms for a constant offset, an independent per-token loop implementation
of verl's formulas on random ragged data, agreement with conformance.metrics where the quantities are
the same, and the no-torch import. Equality with the frameworks' *own* functions is tested where the
framework is installed: examples/frameworks/verl/tests/test_framework_code.py.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from conformance.metrics import compute_metrics
from conformance.rl_metrics import (
    NEMO_RL_MULT_PROB_ERROR_GATE,
    nemo_rl_gate_passes,
    nemo_rl_token_mult_prob_error,
    pad,
    rl_framework_metrics,
    trl_sampling_metrics,
    verl_is_metrics,
    verl_offpolicy_metrics,
    verl_rollout_corr_metrics,
)


def _random_batch(seed: int, n: int = 6, scale: float = 0.3) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    engine = [np.log(rng.uniform(0.01, 1.0, size=int(rng.integers(1, 12)))) for _ in range(n)]
    trainer = [e + rng.normal(0.0, scale, size=e.size) for e in engine]
    return trainer, engine


def test_pad_right_pads_with_a_mask() -> None:
    values, mask = pad([[1.0, 2.0], [3.0], []])
    assert values.tolist() == [[1.0, 2.0], [3.0, 0.0], [0.0, 0.0]]
    assert mask.tolist() == [[True, True], [True, False], [False, False]]


def test_identical_logprobs_are_perfect_everywhere() -> None:
    engine = [np.array([-0.5, -1.0, -2.0]), np.array([-0.1])]
    m = rl_framework_metrics(engine, engine)
    assert m.trl.logp_diff_mean == m.trl.logp_diff_max == 0.0
    assert m.trl.is_min == m.trl.is_mean == m.trl.is_max == 1.0
    assert m.trl.frac_over_cap == 0.0
    v = m.verl
    assert v.kl == v.k3_kl == v.chi2_seq == v.log_ppl_abs_diff == 0.0
    assert v.chi2_token == pytest.approx(0.0, abs=1e-8)  # verl's masked mean divides by count + 1e-8
    assert v.rollout_is_eff_sample_size == pytest.approx(1.0)
    assert v.rollout_is_mean == pytest.approx(1.0) and v.rollout_is_seq_mean == pytest.approx(1.0)
    assert m.nemo_rl_mult_prob_error == 1.0 and m.nemo_rl_gate_passes
    assert "passes the 1.05 gate" in m.summary()


@pytest.mark.parametrize("c", [0.05, -0.05, 0.4])
def test_constant_offset_closed_forms(c: float) -> None:
    engine = [np.full(4, -1.0), np.full(2, -2.0)]
    trainer = [e + c for e in engine]
    trl_tok = trl_sampling_metrics(trainer, engine, mode="token_truncate", clip_max=None)
    assert trl_tok.is_mean == pytest.approx(math.exp(c)) and trl_tok.logp_diff_max == pytest.approx(abs(c))
    trl_seq = trl_sampling_metrics(trainer, engine, mode="sequence_truncate", clip_max=None)
    assert sorted([trl_seq.is_min, trl_seq.is_max]) == pytest.approx(sorted([math.exp(4 * c), math.exp(2 * c)]))
    off = verl_offpolicy_metrics(trainer, engine)
    assert off["kl"] == pytest.approx(-c)
    assert off["k3_kl"] == pytest.approx(math.exp(c) - c - 1)
    assert off["chi2_token"] == pytest.approx(math.exp(2 * c) - 1)
    assert off["chi2_seq"] == pytest.approx((math.exp(8 * c) + math.exp(4 * c)) / 2 - 1)
    assert off["log_ppl_diff"] == pytest.approx(-c) and off["log_ppl_abs_diff"] == pytest.approx(abs(c))
    assert off["ppl_ratio"] == pytest.approx(math.exp(-c))
    assert nemo_rl_token_mult_prob_error(trainer, engine) == pytest.approx(math.exp(abs(c)))


def test_trl_modes_truncate_and_mask_by_hand() -> None:
    # Δ per token: seq 0 = [log 4, 0], seq 1 = [log 0.5]
    engine = [np.array([-2.0, -1.0]), np.array([-1.0])]
    trainer = [np.array([-2.0 + math.log(4.0), -1.0]), np.array([-1.0 + math.log(0.5)])]
    tt = trl_sampling_metrics(trainer, engine, mode="token_truncate", clip_max=3.0)
    assert (tt.is_min, tt.is_max) == pytest.approx((0.5, 3.0))
    assert tt.is_mean == pytest.approx((3.0 + 1.0 + 0.5) / 3)
    assert tt.frac_over_cap == pytest.approx(1 / 3) and tt.raw_is_max == pytest.approx(4.0)
    assert tt.logp_diff_max == pytest.approx(math.log(4.0))
    assert tt.logp_diff_mean == pytest.approx((math.log(4.0) + 0 + math.log(2.0)) / 3)
    tm = trl_sampling_metrics(trainer, engine, mode="token_mask", clip_max=3.0, clip_min=0.6)
    assert (tm.is_min, tm.is_max) == pytest.approx((0.0, 1.0))  # 4 > 3 and 0.5 < 0.6 are masked to 0
    assert tm.frac_under_min == pytest.approx(1 / 3)
    sm = trl_sampling_metrics(trainer, engine)  # TRL's defaults: sequence_mask, cap 3
    assert (sm.mode, sm.clip_max, sm.n_ratios) == ("sequence_mask", 3.0, 2)
    # sequence ratios: 4 (masked: > 3) and 0.5
    assert (sm.is_min, sm.is_max, sm.is_mean) == pytest.approx((0.0, 0.5, 0.25))
    assert sm.frac_over_cap == pytest.approx(0.5)
    st = trl_sampling_metrics(trainer, engine, mode="sequence_truncate", clip_max=3.0)
    assert (st.is_min, st.is_max) == pytest.approx((0.5, 3.0))


def test_trl_nan_engine_value_counts_as_ratio_one() -> None:
    engine = [np.array([-1.0, math.nan])]
    trainer = [np.array([-1.0 + 0.2, -3.0])]
    m = trl_sampling_metrics(trainer, engine, mode="token_truncate", clip_max=None)
    assert m.logp_diff_max == pytest.approx(0.2) and m.logp_diff_mean == pytest.approx(0.2)
    assert (m.is_min, m.is_max) == pytest.approx((1.0, math.exp(0.2)))


def _verl_by_loops(
    trainer: list[np.ndarray], engine: list[np.ndarray], level: str, threshold: float
) -> dict[str, float]:
    """verl's formulas token by token, written independently of the module (no padding, no masks)."""
    deltas = [[float(t) - float(e) for t, e in zip(ts, es)] for ts, es in zip(trainer, engine)]
    flat = [d for ds in deltas for d in ds]
    n = len(flat)
    out: dict[str, float] = {}
    out["kl"] = sum(-d for d in flat) / n
    out["k3_kl"] = sum(math.exp(d) - d - 1 for d in flat) / n
    lt = [sum(ts) / len(ts) for ts in trainer]
    lr = [sum(es) / len(es) for es in engine]
    out["training_ppl"] = sum(math.exp(-x) for x in lt) / len(lt)
    out["rollout_log_ppl"] = sum(-x for x in lr) / len(lr)
    diffs = [r - t for r, t in zip(lr, lt)]
    out["log_ppl_abs_diff"] = sum(abs(x) for x in diffs) / len(diffs)
    out["chi2_token"] = sum(math.exp(2 * max(min(d, 20), -20)) for d in flat) / n - 1
    out["chi2_seq"] = sum(math.exp(2 * max(min(sum(ds), 20), -20)) for ds in deltas) / len(deltas) - 1
    if level == "token":
        raw = [[math.exp(max(min(d, 20), -20)) for d in ds] for ds in deltas]
    else:
        raw = [[math.exp(max(min(sum(ds), 20), -20))] * len(ds) for ds in deltas]
    w = [[min(x, threshold) for x in xs] for xs in raw]
    wf = [x for xs in w for x in xs]
    mean = sum(wf) / n
    out["rollout_is_mean"] = mean
    out["rollout_is_eff_sample_size"] = mean**2 / (sum(x * x for x in wf) / n)
    out["rollout_is_std"] = math.sqrt(max(sum(x * x for x in wf) / n - mean**2, 0.0))
    seq = [sum(xs) / len(xs) for xs in w]
    out["rollout_is_seq_mean"] = sum(seq) / len(seq)
    out["rollout_is_seq_max_deviation"] = max(abs(s - 1) for s in seq)
    if level == "token":
        rf = [x for xs in raw for x in xs]
        out["rollout_is_ratio_fraction_high"] = sum(x > threshold for x in rf) / n
        out["rollout_is_max"] = max(wf)
    return out


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_verl_matches_an_independent_loop_implementation(level: str, seed: int) -> None:
    trainer, engine = _random_batch(seed, scale=0.6)
    got = verl_rollout_corr_metrics(trainer, engine, rollout_is=level, rollout_is_threshold=2.0).as_dict()  # type: ignore[arg-type]
    want = _verl_by_loops(trainer, engine, level, 2.0)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_verl_masked_means_carry_verls_epsilon() -> None:
    """verl divides by mask.sum() + 1e-8: a one-token sequence's mean weight is 1 - 1e-8, not 1."""
    m = verl_is_metrics([np.zeros(1)], [np.zeros(1)])
    assert m["rollout_is_seq_mean"] == pytest.approx(1.0 / (1.0 + 1e-8), rel=1e-15)


def test_verl_sequence_level_max_min_and_fractions_are_per_sequence() -> None:
    engine = [np.zeros(3), np.zeros(1)]
    trainer = [np.array([0.5, 0.5, 0.5]), np.array([-1.0])]  # Σ Δ: 1.5 and -1
    m = verl_is_metrics(trainer, engine, rollout_is="sequence", rollout_is_threshold=2.0)
    assert m["rollout_is_max"] == pytest.approx(math.exp(1.5)) and m["rollout_is_min"] == pytest.approx(math.exp(-1))
    assert m["rollout_is_ratio_fraction_high"] == 0.5 and m["rollout_is_ratio_fraction_low"] == 0.5
    assert m["rollout_is_mean"] == pytest.approx((3 * 2.0 + math.exp(-1)) / 4)


def test_prefixed_names_are_verl_log_keys() -> None:
    trainer, engine = _random_batch(3)
    keys = verl_rollout_corr_metrics(trainer, engine).prefixed()
    assert {
        "rollout_corr/k3_kl",
        "rollout_corr/chi2_token",
        "rollout_corr/chi2_seq",
        "rollout_corr/log_ppl_abs_diff",
        "rollout_corr/rollout_is_eff_sample_size",
    } <= set(keys)


@pytest.mark.parametrize("seed", [0, 4])
def test_agrees_with_the_kit_metrics_on_shared_quantities(seed: int) -> None:
    trainer, engine = _random_batch(seed, scale=0.1)
    kit = compute_metrics(np.concatenate(trainer), np.concatenate(engine))
    m = rl_framework_metrics(trainer, engine, verl_threshold=1e9)
    assert m.verl.k3_kl == pytest.approx(kit.k3_kl, rel=1e-9)
    assert m.verl.kl == pytest.approx(kit.k1_kl, rel=1e-9)
    assert m.nemo_rl_mult_prob_error == pytest.approx(kit.mult_prob_error, rel=1e-9)
    assert m.verl.rollout_is_eff_sample_size == pytest.approx(kit.ess, rel=1e-6)  # untruncated: the same ESS
    assert m.trl.logp_diff_mean == pytest.approx(kit.mean_abs, rel=1e-9)
    assert m.trl.logp_diff_max == pytest.approx(kit.max_abs, rel=1e-9)


def test_nemo_rl_gate() -> None:
    assert NEMO_RL_MULT_PROB_ERROR_GATE == 1.05
    assert nemo_rl_gate_passes(1.049) and not nemo_rl_gate_passes(1.05)
    engine = [np.zeros(4)]
    assert not nemo_rl_gate_passes(nemo_rl_token_mult_prob_error([np.full(4, 0.06)], engine))


def test_columns_and_summary() -> None:
    trainer, engine = _random_batch(5, scale=1.5)
    m = rl_framework_metrics(trainer, engine)
    assert set(m.columns()) == {
        "trl_is_max",
        "trl_frac_over_cap",
        "verl_k3",
        "verl_chi2_token",
        "verl_chi2_seq",
        "verl_log_ppl_abs_diff",
        "verl_is_ess",
        "nemo_mult_prob_error",
    }
    assert "TRL sequence_mask (cap 3)" in m.summary() and "FAILS the 1.05 gate" in m.summary()


def test_bad_input_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match="2 and 1 sequences"):
        verl_offpolicy_metrics([[0.0], [0.0]], [[0.0]])
    with pytest.raises(ValueError, match="sequence 0: 2 trainer values vs 1 engine values"):
        trl_sampling_metrics([[0.0, 0.0]], [[0.0]])
    with pytest.raises(ValueError, match="no tokens"):
        nemo_rl_token_mult_prob_error([[]], [[]])
    with pytest.raises(ValueError, match="unknown TRL"):
        trl_sampling_metrics([[0.0]], [[0.0]], mode="token")  # type: ignore[arg-type]


def test_module_imports_no_torch() -> None:
    code = "import sys, conformance.rl_metrics; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False, capture_output=True).returncode == 0
