"""Distribution layer: beyond the sampled token, the reported distribution is the reference's, and the
engine samples from the distribution it reports.

* Top-k: with ``logprobs=20`` the engine's top-20 tokens must be a valid top-20 of the contract's values
  (any token it lists ranks within the cell's tolerance of the reference's 20th value), the mass it
  reports over them must match the reference's mass of the same tokens, and the KL divergence over the
  shared support must stay within what the tolerance allows.
* Sampling: N unseeded one-token draws at one position must follow exp(reported logprobs): a chi-square
  goodness-of-fit test at α = 1e-3 (the false-positive rate of a clean engine is therefore 0.1% per
  test run; see docs/tolerances.md).
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from conformance import contract
from conformance.engines.base import Request
from conformance.plugin.fixture import Parity
from conformance.spec import SamplingSpec

pytestmark = [pytest.mark.parity, pytest.mark.family("distribution")]

TOP = 20
ALPHA = 1e-3
DRAWS = 1500


def chi_square_sf(statistic: float, dof: int) -> float:
    """Survival function of the chi-square distribution (regularised upper incomplete gamma)."""
    return float(
        torch.special.gammaincc(
            torch.tensor(dof / 2.0, dtype=torch.float64), torch.tensor(statistic / 2.0, dtype=torch.float64)
        )
    )


def goodness_of_fit(counts: dict[int, int], probs: dict[int, float], other: float) -> tuple[float, int, float]:
    """Pearson chi-square of observed token counts against probabilities (bins with expected < 5 merged
    into 'other'). Returns (statistic, degrees of freedom, p-value)."""
    total = sum(counts.values())
    bins: list[tuple[float, float]] = []
    rest_obs, rest_exp = 0.0, other * total
    for token, p in probs.items():
        expected = p * total
        if expected >= 5:
            bins.append((counts.get(token, 0), expected))
        else:
            rest_obs += counts.get(token, 0)
            rest_exp += expected
    rest_obs += sum(c for t, c in counts.items() if t not in probs)
    if rest_exp >= 5:
        bins.append((rest_obs, rest_exp))
    elif rest_obs > 0 and bins:
        # unexpected tokens with (almost) no reported mass: fold into the largest bin's deviation
        bins.append((rest_obs, max(rest_exp, 1e-9)))
    statistic = sum((o - e) ** 2 / e for o, e in bins)
    dof = max(len(bins) - 1, 1)
    return statistic, dof, chi_square_sf(statistic, dof)


@pytest.mark.parametrize(
    "spec",
    [
        SamplingSpec(temperature=1.0, max_tokens=8, logprobs=TOP, seed=11),
        SamplingSpec(temperature=0.7, top_p=0.95, max_tokens=8, logprobs=TOP, seed=12),
    ],
    ids=["t1", "t0.7-top_p0.95"],
)
def test_top_k_distribution_matches_reference(parity: Parity, spec: SamplingSpec) -> None:
    requests = [Request(parity.prompts.ids[i], spec) for i in (0, 2, 9)]
    samples = parity.generate(requests)
    parity.assert_passed(parity.judge(requests, samples))
    tolerance = parity.max_abs(spec, parity.target)
    mode = parity.cell.logprobs_mode
    problems: list[str] = []
    for request, group in zip(requests, samples):
        sample = group[0]
        context = parity.engine.token_context(request)
        raw = parity.runner.reference.raw_logits([(sample.prompt_ids, sample.output_ids)])[0]
        dist = contract.processed_distribution(raw, sample.output_ids, spec, context)
        values = contract.mode_values(dist, raw, mode)
        for pos, top in enumerate(sample.top_values):
            engine_tokens = sorted(top, key=lambda t: -top[t])[:TOP]
            ref_sorted = torch.sort(values[pos], descending=True).values
            kth = float(ref_sorted[min(TOP, len(ref_sorted)) - 1])
            for t in engine_tokens:
                if float(values[pos, t]) < kth - 2 * tolerance and math.isfinite(top[t]):
                    problems.append(
                        f"pos {pos}: token {t} is in the engine's top-{TOP} but ranks below the "
                        f"reference's {TOP}th value by {kth - float(values[pos, t]):.3g}"
                    )
            if mode.endswith("logprobs"):
                finite = [t for t in engine_tokens if math.isfinite(top[t])]
                eng_mass = sum(math.exp(top[t]) for t in finite)
                ref_mass = float(torch.exp(values[pos, finite]).sum()) if finite else 0.0
                if abs(eng_mass - ref_mass) > max(1e-3, 2 * tolerance):
                    problems.append(
                        f"pos {pos}: mass of the engine's top-{TOP} {eng_mass:.4f} vs reference {ref_mass:.4f}"
                    )
                shared = [t for t in finite if math.isfinite(float(values[pos, t]))]
                if shared:
                    p = torch.softmax(values[pos, shared].double(), dim=0)
                    q = torch.softmax(torch.tensor([top[t] for t in shared], dtype=torch.float64), dim=0)
                    kl = float((p * (p.log() - q.log())).sum())
                    if kl > tolerance**2 + 1e-6:
                        problems.append(f"pos {pos}: KL(reference || engine) over the shared top-{TOP} {kl:.3g}")
    assert not problems, (
        f"top-{TOP} distribution FAILED [layer: inference-path] in cell {parity.cell.id!r} "
        f"({spec.describe()}):\n  " + "\n  ".join(problems[:10])
    )


def test_sampling_follows_reported_probabilities(parity: Parity) -> None:
    """N unseeded draws of the first token; chi-square against the engine's own reported probabilities."""
    mode = parity.cell.logprobs_mode
    if not mode.endswith("logprobs"):
        pytest.skip(f"cell {parity.cell.id} reports {mode}, not probabilities")
    # top_k=8 makes the whole processed support visible in the top-20; raw cells report the full
    # distribution's top-20 and the rest of the mass goes to an 'other' bin.
    spec = SamplingSpec(temperature=1.0, top_k=8, max_tokens=1, logprobs=TOP)
    prompt = parity.prompts.ids[0]
    samples = parity.generate([Request(prompt, spec) for _ in range(DRAWS)])
    counts = Counter(s.output_ids[0] for group in samples for s in group)
    reported = samples[0][0].top_values[0]
    probs = {t: math.exp(v) for t, v in reported.items() if math.isfinite(v)}
    other = max(0.0, 1.0 - sum(probs.values()))
    if mode == "raw_logprobs":
        # raw values describe the raw distribution; the sampler drew from the top-8 renormalised
        top8 = sorted(probs, key=lambda t: -probs[t])[:8]
        mass = sum(probs[t] for t in top8)
        probs, other = {t: probs[t] / mass for t in top8}, 0.0
    statistic, dof, p_value = goodness_of_fit(dict(counts), probs, other)
    expected = {t: round(p * DRAWS, 1) for t, p in sorted(probs.items(), key=lambda kv: -kv[1])[:8]}
    assert p_value >= ALPHA, (
        f"sampling FAILED [layer: semantic] in cell {parity.cell.id!r}: {DRAWS} draws do not follow the "
        f"reported probabilities (chi-square {statistic:.1f}, dof {dof}, p = {p_value:.2g} < {ALPHA}); "
        f"observed counts {dict(counts.most_common(8))}, expected {expected}"
    )
