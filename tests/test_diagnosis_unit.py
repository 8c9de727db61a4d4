"""conformance/diagnosis.py with a fake runner (no engine, no reference): what a diagnosis changes in the
report. The plugin path end to end is tests/test_diagnosis.py; real engines tests/test_selftest_diagnosis.py."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from conformance.diagnosis import DiagnosisSettings, diagnose
from conformance.engines.base import EngineFailure, Request
from conformance.spec import SamplingSpec

FAILING = SamplingSpec(temperature=0.8, top_p=0.5, min_p=0.3, frequency_penalty=0.2, seed=5, max_tokens=4)


@dataclass
class FakeRunner:
    """generate() echoes the requests; judge() fails while ``fails(spec)``; every call is logged."""

    fails: Callable[[SamplingSpec], bool]
    variant_at: Callable[[SamplingSpec], str | None] = lambda spec: None
    generated: list[list[Request]] = field(default_factory=list)
    raise_on: Callable[[SamplingSpec], bool] = lambda spec: False

    def generate(self, requests: Sequence[Request]) -> Any:
        if self.raise_on(requests[0].spec):
            raise EngineFailure("engine died")
        self.generated.append(list(requests))
        return [[None] for _ in requests]

    def judge(self, requests: Sequence[Request], samples: Any, test: str = "", *, record: bool = True) -> Any:
        assert record is False  # re-runs of a diagnosis are never recorded as checks
        spec = requests[0].spec
        variant = self.variant_at(spec)
        return SimpleNamespace(
            passed=not self.fails(spec),
            spec=spec,
            variant=variant,
            variant_ties=[],
            alternatives={variant: 1e-6} if variant else {},
        )


def _report(layer: str = "inference-path", matched: str | None = None) -> Any:
    return SimpleNamespace(
        passed=False,
        spec=FAILING,
        layer=layer,
        reasons=["max |Δ| 0.5 > 0.0001"],
        variant=None,
        variant_ties=[],
        matched=matched,
        diagnosis=None,
    )


REQUESTS = [Request((1, 2, 3), FAILING), Request((4, 5), SamplingSpec(**{**FAILING.__dict__, "seed": 6}))]


def _pair(spec: SamplingSpec) -> bool:
    return spec.top_p < 1.0 and spec.min_p > 0.0


def test_a_parameter_dependent_failure_becomes_semantic_and_gets_the_variant_found_at_the_minimal_spec() -> None:
    runner = FakeRunner(_pair, variant_at=lambda s: "top_p before min_p" if s.temperature == 1.0 and _pair(s) else None)
    report = _report()
    diagnosis = diagnose(runner, REQUESTS, report, DiagnosisSettings(), "t")  # type: ignore[arg-type]
    assert diagnosis is report.diagnosis and diagnosis.ablation is not None
    assert diagnosis.ablation.minimal == ("min_p", "top_p")
    assert len(runner.generated) == diagnosis.ablation.calls == 4 + 1 + 2  # one at a time, the pair, its halves
    for batch in runner.generated:  # same prompts, each request keeps its own seed and max_tokens
        assert [r.prompt_ids for r in batch] == [(1, 2, 3), (4, 5)]
        assert [r.spec.seed for r in batch] == [5, 6] and all(r.spec.max_tokens == 4 for r in batch)
    assert report.layer == "semantic"
    assert report.reasons[0].startswith("the failure needs min_p and top_p (ablation")
    assert report.variant == "top_p before min_p"
    assert any("at the minimal parameters SamplingSpec(top_p=0.5, min_p=0.3" in n for n in diagnosis.notes)
    assert diagnosis.minimal_spec == "SamplingSpec(top_p=0.5, min_p=0.3, max_tokens=4, seed=5)"
    lines = diagnosis.lines()
    assert lines[0].startswith("cause (ablation, ") and "fails only while min_p=0.3 and top_p=0.5" in lines[0]
    assert diagnosis.as_record()["ablation"]["minimal"] == ["min_p", "top_p"]


def test_a_failure_without_parameters_keeps_its_layer() -> None:
    runner = FakeRunner(lambda spec: True)
    report = _report()
    diagnose(runner, REQUESTS, report, DiagnosisSettings(), "t")  # type: ignore[arg-type]
    assert report.diagnosis.ablation.minimal == ()
    assert report.layer == "inference-path" and report.variant is None
    assert report.reasons == ["max |Δ| 0.5 > 0.0001"]


def test_an_explained_failure_keeps_its_explanation() -> None:
    runner = FakeRunner(_pair, variant_at=lambda s: "top_p first")
    report = _report(layer="semantic", matched="raw_logprobs")
    diagnose(runner, REQUESTS, report, DiagnosisSettings(), "t")  # type: ignore[arg-type]
    assert report.variant is None and report.diagnosis.notes == []


def test_off_and_budget_and_engine_errors() -> None:
    runner = FakeRunner(_pair)
    assert diagnose(runner, REQUESTS, _report(), DiagnosisSettings(enabled=False), "t") is None  # type: ignore[arg-type]
    assert runner.generated == []
    report = _report()
    diagnose(runner, REQUESTS, report, DiagnosisSettings(max_calls=2), "t")  # type: ignore[arg-type]
    assert len(runner.generated) == 2 and not report.diagnosis.ablation.proven
    assert report.layer == "inference-path"  # an unproven set does not reclass the failure
    dying = FakeRunner(_pair, raise_on=lambda spec: spec.temperature == 1.0)
    report = _report()
    diagnose(dying, REQUESTS, report, DiagnosisSettings(), "t")  # type: ignore[arg-type]
    assert report.diagnosis.ablation.one_at_a_time["temperature"] == "error"
    assert report.layer == "inference-path"
