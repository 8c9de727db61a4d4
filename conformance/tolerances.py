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

fp32 on the CPU is exact to ~1e-5 (measured ≤ 9e-6 max |Δ|), so its bounds sit one order above that and
leave room only for real bugs. bf16 bounds come from ``benchmarks/noise.py`` over clean runs: the bound
is the worst value seen over all clean checks times a safety factor of 2 (rounded up), which gave 0
false positives over the clean runs documented in docs/tolerances.md.
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

    def with_overrides(self, overrides: dict[str, Any], where: str) -> "Tolerance":
        """A copy with the given fields replaced; unknown names raise ``ValueError`` naming ``where``."""
        known = {f.name for f in fields(self)}
        for key, value in overrides.items():
            if key not in known:
                raise ValueError(f"{where}: unknown tolerance key {key!r} (known: {', '.join(sorted(known))})")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{where}: tolerance {key} must be a non-negative number, got {value!r}")
        return replace(self, **{k: float(v) for k, v in overrides.items()})


DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    # CPU fp32: measured max |Δ| ≤ 1e-5 (docs/tolerances.md); issue 2 asks ≤ 1e-4.
    "cpu-float32": Tolerance(band=1e-4, max_abs=1e-4, mean_abs=1e-5, bias=1e-5),
    # CPU bf16 (bf16 weights, activations and lm_head): measured in docs/tolerances.md.
    "cpu-bfloat16": Tolerance(band=0.25, max_abs=0.6, mean_abs=0.06, bias=0.02),
    "cpu-bfloat16-head32": Tolerance(band=0.25, max_abs=0.6, mean_abs=0.06, bias=0.02),
    "cpu-float16": Tolerance(band=0.1, max_abs=0.3, mean_abs=0.03, bias=0.01),
    "cpu-float16-head32": Tolerance(band=0.1, max_abs=0.3, mean_abs=0.03, bias=0.01),
    # GPU fp32 runs TRITON_ATTN with TF32 dot products: max |Δ| ≈ 2e-2 measured on an H100.
    "gpu-float32": Tolerance(band=0.05, max_abs=0.1, mean_abs=0.01, bias=0.005),
    "gpu-bfloat16": Tolerance(band=0.25, max_abs=0.6, mean_abs=0.06, bias=0.02),
    "gpu-bfloat16-head32": Tolerance(band=0.25, max_abs=0.6, mean_abs=0.06, bias=0.02),
    "gpu-float16": Tolerance(band=0.1, max_abs=0.3, mean_abs=0.03, bias=0.01),
    "gpu-float16-head32": Tolerance(band=0.1, max_abs=0.3, mean_abs=0.03, bias=0.01),
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
