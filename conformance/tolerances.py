"""Tolerances per precision class, derived from measured noise (see docs/tolerances.md).

A cell's precision class is ``<tier>-<dtype>[-head32]``. Each :class:`Tolerance` bounds the difference
Δ = expected − engine over the tokens one check compares (one hypothesis example: a batch of sequences):

* ``band``: the largest raw-logit error the class allows; it widens truncation decisions (top-k / top-p /
  min-p membership) into "surely kept" and "maybe kept" (see :mod:`conformance.contract`).
* ``max_abs``: bound on max |Δ| over checked tokens (boundary tokens use their distance to the legitimate
  interval instead of the point value).
* ``mean_abs``: bound on mean |Δ|.
* ``bias``: bound on the systematic part of mean Δ: a check fails the bias test when
  ``|mean Δ| > bias + 4 * std(Δ) / sqrt(n)`` (4σ: a false-positive rate below 1e-4 per check for
  Gaussian noise). A raw-vs-processed mix-up at T=0.7 gives |mean Δ| of 0.3-1 nat; bf16 noise gives
  a few thousandths.

Derivation (docs/tolerances.md): ``benchmarks/noise.py`` runs clean engines over the suite's own
hypothesis cases and records each metric per check, normalised to T >= 1. A bound is at least twice the
worst value seen over all clean checks (usually 3-6x), which gave 0 false positives in those runs; by the
rule of three that bounds the per-check false-positive rate below 3% at 95% confidence for 100 checks,
and the suite's repeated clean runs (issue 7) tighten it further. fp32 on the CPU is exact to ~2e-5, so
its bounds leave room only for real bugs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any


@dataclass(frozen=True)
class Tolerance:
    """Bounds for one precision class; all in nats (logprob units) except ``band`` (raw-logit units)."""

    band: float
    max_abs: float
    mean_abs: float
    bias: float

    def with_overrides(self, overrides: dict[str, Any], where: str) -> Tolerance:
        """A copy with the given fields replaced; unknown names raise ``ValueError`` naming ``where``."""
        known = {f.name for f in fields(self)}
        for key, value in overrides.items():
            if key not in known:
                raise ValueError(f"{where}: unknown tolerance key {key!r} (known: {', '.join(sorted(known))})")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{where}: tolerance {key} must be a non-negative number, got {value!r}")
        return replace(self, **{k: float(v) for k, v in overrides.items()})


DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    # Measured worst over 100 clean checks per cell (benchmarks/noise.py, docs/tolerances.md), in T >= 1
    # units. fp32 CPU: max |Δ| 1.8e-5, mean |Δ| 8.1e-6 -> bounds 5.7x and 3.7x above.
    "cpu-float32": Tolerance(band=1e-4, max_abs=1e-4, mean_abs=3e-5, bias=2e-5),
    # bf16 CPU: max |Δ| 0.103 (processed) / 0.093 (raw top-n), mean |Δ| 0.032; raw-logit error of the
    # top-n ~0.09, so the band (0.25) covers it 2.7x.
    "cpu-bfloat16": Tolerance(band=0.25, max_abs=0.6, mean_abs=0.07, bias=0.02),
    "cpu-bfloat16-head32": Tolerance(band=0.25, max_abs=0.6, mean_abs=0.07, bias=0.02),
    # fp16 has not been measured here; bf16's bounds scaled by its 8x finer mantissa would be too tight
    # to trust without data, so fp16 cells reuse the bf16 bounds until measured.
    "cpu-float16": Tolerance(band=0.25, max_abs=0.6, mean_abs=0.07, bias=0.02),
    "cpu-float16-head32": Tolerance(band=0.25, max_abs=0.6, mean_abs=0.07, bias=0.02),
    # GPU fp32 (H200, vLLM 0.26.0, TRITON_ATTN): max |Δ| 3.4e-3, mean |Δ| 9.6e-4 over 30 checks.
    "gpu-float32": Tolerance(band=0.01, max_abs=0.02, mean_abs=0.003, bias=0.002),
    # GPU bf16 (H200): max |Δ| 0.085, mean |Δ| 0.029 over 30 checks per cell (eager, graphs, head32, raw).
    "gpu-bfloat16": Tolerance(band=0.25, max_abs=0.6, mean_abs=0.07, bias=0.02),
    "gpu-bfloat16-head32": Tolerance(band=0.25, max_abs=0.6, mean_abs=0.07, bias=0.02),
    "gpu-float16": Tolerance(band=0.25, max_abs=0.6, mean_abs=0.07, bias=0.02),
    "gpu-float16-head32": Tolerance(band=0.25, max_abs=0.6, mean_abs=0.07, bias=0.02),
}


def precision_class(tier: str, dtype: str, head_dtype: str | None) -> str:
    """``<tier>-<dtype>`` plus ``-head32`` when a lower-precision model keeps an fp32 lm_head."""
    name = f"{tier}-{dtype}"
    if head_dtype == "float32" and dtype != "float32":
        name += "-head32"
    return name


def tolerance_for(tier: str, dtype: str, head_dtype: str | None) -> Tolerance:
    """The default tolerance of a precision class (``KeyError`` never escapes: unknown -> ValueError)."""
    key = precision_class(tier, dtype, head_dtype)
    try:
        return DEFAULT_TOLERANCES[key]
    except KeyError:
        raise ValueError(
            f"no tolerance is defined for precision class {key!r}; give the cell a [tolerance] table"
        ) from None
