"""Diagnosis of a failing check: which parameters cause it, which step differs, and the upstream reproduction.

The ``parity`` fixture (:mod:`conformance.plugin.fixture`) calls :func:`diagnose` once per failing test, on
the check it is about to fail with (hypothesis' final replay of the minimal example, or a plain test's
check), never on passing checks or intermediate shrink steps. It

* re-runs the same requests (same prompts, same seeds, same engine) with the failing spec's sampling
  parameters reset to their defaults, one at a time and then by delta debugging
  (:mod:`conformance.ablation`), at most ``max_calls`` engine calls; re-runs are judged the same way but
  not recorded as checks;
* when the failure needs some of the parameters (it passes with any one of the minimal set reset, and every
  re-run that kept the whole set failed) and the check was classed ``inference-path``, reclasses it
  ``semantic``: a numerical-path difference does not come and go with a sampling parameter. (In a cell
  whose tolerance sits near its noise, bf16, a borderline failure can pass or fail at random; the
  one-at-a-time table in the message shows every outcome.)
* when the failing values match no step-order variant but the re-run at the minimal parameters does,
  names that variant (:data:`conformance.contract.VARIANTS`);
* with ``repro_dir``, writes the self-contained upstream reproduction (:mod:`conformance.repro`) of the
  minimal failing requests (the original ones when the ablation found no smaller failing set).

The result is set on the report (``report.diagnosis``): :meth:`ParityReport.explain` prints it and the
check's results record carries ``ablation`` and ``repro``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from conformance.ablation import ABLATED_FIELDS, DEFAULT_MAX_CALLS, Ablation, Outcome, ablate

if TYPE_CHECKING:
    from conformance.engines.base import Request
    from conformance.parity import ParityReport
    from conformance.runner import ParityRunner
    from conformance.spec import SamplingSpec


@dataclass(frozen=True)
class DiagnosisSettings:
    """``--parity-diagnose`` / ``--parity-diagnose-calls`` / ``--parity-repro-dir``."""

    enabled: bool = True
    """Ablate failing checks (on by default; costs nothing on passing checks)."""
    max_calls: int = DEFAULT_MAX_CALLS
    """Engine re-runs one ablation may spend."""
    repro_dir: Path | None = None
    """Where failing checks write their upstream reproduction script (None: none is written)."""

    @property
    def active(self) -> bool:
        return self.enabled or self.repro_dir is not None


@dataclass
class Diagnosis:
    """What :func:`diagnose` found for one failing check."""

    ablation: Ablation | None = None
    repro: Path | None = None
    seconds: float = 0.0
    """Wall time of the diagnosis (the engine re-runs, their judging and writing the script)."""
    minimal_spec: str | None = None
    """The spec of the minimal failing re-run (``describe()``), when smaller than the failing one."""
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The lines :meth:`ParityReport.explain` prints (without indentation)."""
        out = []
        if self.ablation is not None:
            out.append(f"cause (ablation, {self.seconds:.1f} s): {self.ablation.summary()}")
            if self.ablation.one_at_a_time:
                out.append("one at a time: " + "; ".join(self.ablation.table()))
        out += self.notes
        if self.repro is not None:
            out.append(f"upstream reproduction (vLLM offline + fp32 HF, no kit import): python {self.repro}")
        return out

    def as_record(self) -> dict[str, object]:
        """The keys a failing check's results record gets."""
        return {
            "ablation": self.ablation.as_record() if self.ablation is not None else None,
            "repro": str(self.repro) if self.repro is not None else None,
            "diagnosis_seconds": round(self.seconds, 3),
        }


def in_final_run() -> bool:
    """Whether a failure now is the one the test will report: outside hypothesis (a plain test runs its
    check once), or in hypothesis' final replay of the minimal failing example (not while it generates or
    shrinks)."""
    try:
        from hypothesis.control import current_build_context
        from hypothesis.errors import InvalidArgument
    except ImportError:  # pragma: no cover - hypothesis is a dependency
        return True
    try:
        return bool(current_build_context().is_final)
    except InvalidArgument:
        return True


def _reset_requests(requests: Sequence[Request], names: Sequence[str]) -> list[Request]:
    """``requests`` with ``names`` reset in each spec (seeds and every other field kept)."""
    return [dataclasses.replace(r, spec=r.spec.reset(*names)) for r in requests]


def diagnose(
    runner: ParityRunner,
    requests: Sequence[Request],
    report: ParityReport,
    settings: DiagnosisSettings,
    test: str = "",
) -> Diagnosis | None:
    """Diagnose the failing ``report`` of ``requests`` on ``runner``'s engine (see the module docstring);
    sets ``report.diagnosis`` (and may set ``report.layer`` / ``report.variant``). None when ``settings``
    ask for nothing or the report passed."""
    if report.passed or not settings.active:
        return None
    started = time.perf_counter()
    diagnosis = Diagnosis()
    reports: dict[frozenset[str], ParityReport] = {}
    minimal_requests = list(requests)
    if settings.enabled:
        base = report.spec

        def outcome(spec: SamplingSpec) -> Outcome:
            from conformance.engines.base import EngineFailure

            reset = [n for n in ABLATED_FIELDS if getattr(spec, n) != getattr(base, n)]
            rerun = _reset_requests(requests, reset)
            try:
                samples = runner.generate(rerun)
                judged = runner.judge(rerun, samples, test, record=False)
            except EngineFailure:
                return "error"
            reports[frozenset(reset)] = judged
            return "passed" if judged.passed else "failed"

        ablation = ablate(base, outcome, max_calls=settings.max_calls)
        diagnosis.ablation = ablation
        reset = frozenset(n for n in ablation.fields if n not in ablation.minimal)
        at_minimal = reports.get(reset)
        if ablation.minimal and reset and at_minimal is not None and not at_minimal.passed:
            minimal_requests = _reset_requests(requests, sorted(reset))
            diagnosis.minimal_spec = at_minimal.spec.describe()
        if ablation.minimal and ablation.proven and ablation.consistent and report.layer == "inference-path":
            report.layer = "semantic"
            report.reasons.insert(
                0,
                (
                    f"the failure needs {' and '.join(ablation.minimal)} (ablation: the same requests pass with any "
                    "one of them reset), so a sampler step differs, not the numerical path"
                ),
            )
        if report.matched is None and at_minimal is not None and at_minimal.variant is not None:
            from conformance.contract import VARIANTS

            report.variant, report.variant_ties = at_minimal.variant, list(at_minimal.variant_ties)
            variant = VARIANTS[at_minimal.variant]
            diagnosis.notes.append(
                f"at the minimal parameters {at_minimal.spec.describe()} the values match the step-order variant "
                f"{at_minimal.variant!r} ({variant.description}; max |Δ| "
                f"{at_minimal.alternatives.get(at_minimal.variant, float('nan')):.3g})"
            )
            if report.layer == "inference-path":
                report.layer = "semantic"
    if settings.repro_dir is not None:
        diagnosis.repro = write_check_repro(runner, minimal_requests, report, settings.repro_dir, test, diagnosis)
    diagnosis.seconds = time.perf_counter() - started
    report.diagnosis = diagnosis
    return diagnosis


def write_check_repro(
    runner: ParityRunner,
    requests: Sequence[Request],
    report: ParityReport,
    directory: Path,
    test: str,
    diagnosis: Diagnosis | None = None,
) -> Path:
    """Write the upstream reproduction of ``requests`` on ``runner``'s cell (see :mod:`conformance.repro`)."""
    from conformance.engines.vllm_common import cell_env
    from conformance.judge import token_contexts
    from conformance.parity import scaled_tolerance
    from conformance.repro import write_repro

    engine_cell = runner.handle.cell
    spec = requests[0].spec
    bound = scaled_tolerance(runner.cell.tolerance, spec, runner.cell.logprobs_mode).max_abs
    what = [f"Failing check: cell {report.cell!r}, test {test or '-'}, layer {report.layer}."]
    what += [f"Kit verdict: {r}" for r in report.reasons[:3]]
    if diagnosis is not None and diagnosis.ablation is not None:
        what.append(f"Ablation: {diagnosis.ablation.summary()}")
        if diagnosis.minimal_spec:
            what.append(f"These requests use the minimal failing parameters {diagnosis.minimal_spec}.")
    return write_repro(
        directory,
        cell=report.cell,
        test=test,
        title=f"{report.cell}: {spec.describe()}",
        what="\n".join(what),
        model_path=runner.handle.model_path,
        engine_kwargs=engine_cell.engine_kwargs(),
        env=cell_env(engine_cell),
        mode=runner.cell.logprobs_mode,
        bound=bound,
        requests=[(r.prompt_ids, r.spec) for r in requests],
        contexts=token_contexts(runner.engine, requests),
    )
