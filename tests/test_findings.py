"""Known findings: crash findings recognise failure text, divergence findings cover exactly the checks
their condition names, and a covered check xfails the test (any uncovered failure still fails it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conformance.findings import KnownFinding, covering_finding, load_known_findings, match_finding
from conformance.spec import SamplingSpec

ROOT = Path(__file__).resolve().parents[1]
TOPP = KnownFinding(
    id="topp",
    engine="vllm",
    versions=">=0.26,<0.27",
    summary="s",
    kind="divergence",
    when="tier == 'gpu' and top_p < 1 and (min_p > 0 or allowed_token_ids)",
)


def test_divergence_covers_exactly_its_condition() -> None:
    hit = SamplingSpec(top_p=0.7, min_p=0.4)
    assert TOPP.covers("vllm", "0.26.0", hit, "gpu", 8)
    assert TOPP.covers("vllm", "0.26.0", SamplingSpec(top_p=0.7, allowed_token_ids=(1, 2, 3)), "gpu", 8)
    assert not TOPP.covers("vllm", "0.26.0", SamplingSpec(top_p=0.7), "gpu", 8)  # no mask: not covered
    assert not TOPP.covers("vllm", "0.26.0", SamplingSpec(min_p=0.4), "gpu", 8)
    assert not TOPP.covers("vllm", "0.26.0", hit, "cpu", 8)
    assert not TOPP.covers("vllm", "0.32.0", hit, "gpu", 8)  # other version
    assert not TOPP.covers("sglang", "0.26.0", hit, "gpu", 8)
    assert covering_finding("vllm", "0.26.0", hit, "gpu", 8, [TOPP]) is TOPP
    assert match_finding("vllm", "0.26.0", "anything", [TOPP]) is None  # a divergence never matches crash text


def test_a_check_is_covered_by_the_rows_of_its_engine_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """A property generates its cases' requests in one engine call: a check of 2 sequences in a call of 16
    ran in engine steps of up to 16 rows, which a ``rows >= 8`` finding covers (the GPU run of session 5
    failed 37 such checks of the Triton top-p finding because each was counted as its own 2 rows)."""
    import conformance.runner as runner_module
    from conformance.engines.base import Request, Sample
    from conformance.runner import ParityRunner

    finding = KnownFinding(
        id="steps", engine="vllm", versions=">=0.26,<0.27", summary="s", kind="divergence", when="rows >= 8"
    )
    spec = SamplingSpec(top_p=0.7, min_p=0.4)
    requests = [Request((1, 2), spec) for _ in range(8)]

    class Engine:
        name, version, description = "vllm", "0.26.0", "stub"

        def generate(self, batch: list[Request]) -> list[list[Sample]]:
            return [[Sample(r.prompt_ids, [3], [0.0], [{3: 0.0}]) for _ in range(2)] for r in batch]

    class Handle:
        engine, start_seconds, cell = Engine(), 0.0, None

        def identity(self) -> tuple[str, str]:
            return "vllm", "0.26.0"

    class Failed:
        passed, known, spec = False, None, SamplingSpec(top_p=0.7, min_p=0.4)

    monkeypatch.setattr(runner_module, "judge_samples", lambda *a, **k: Failed())
    monkeypatch.setattr(runner_module, "token_contexts", lambda *a, **k: None)
    cell = type(
        "Cell", (), {"id": "c", "tier": "gpu", "tolerance": None, "logprobs_mode": "processed_logprobs", "env": {}}
    )()
    runner = ParityRunner(Handle(), object(), None, cell=cell, findings=[finding])  # type: ignore[arg-type]
    samples = runner.generate(requests)  # 16 sequences in one call
    assert {s.batch_rows for group in samples for s in group} == {16}
    assert runner.judge(requests[:1], samples[:1], record=False).known  # this check: 2 of the call's 16 rows
    alone = [[Sample(s.prompt_ids, s.output_ids, s.sampled_values, s.top_values) for s in samples[0]]]
    assert not runner.judge(requests[:1], alone, record=False).known  # 2 rows in a call of its own


def test_divergence_conditions_can_name_the_batch_and_the_cell_environment() -> None:
    """A batch-state finding (vLLM 0.26's V1 runner copies one request's allowed_token_ids mask onto another
    row) covers a check whose own request sets nothing, when another request of its engine call does."""
    leak = KnownFinding(
        id="leak",
        engine="vllm",
        versions=">=0.26,<0.27",
        summary="s",
        kind="divergence",
        when="'allowed_token_ids' in batch and 'VLLM_USE_V2_MODEL_RUNNER=0' in env",
    )
    plain = SamplingSpec(temperature=0.0)
    v1 = frozenset({"VLLM_USE_V2_MODEL_RUNNER=0"})
    assert leak.covers("vllm", "0.26.0", plain, "gpu", 8, batch=frozenset({"allowed_token_ids"}), env=v1)
    assert not leak.covers("vllm", "0.26.0", plain, "gpu", 8, batch=frozenset({"top_p"}), env=v1)
    assert not leak.covers("vllm", "0.26.0", plain, "gpu", 8, batch=frozenset({"allowed_token_ids"}))
    shipped = {f.id: f for f in load_known_findings()}
    assert shipped["vllm-0.26-v1-runner-allowed-token-ids-swap"].covers(
        "vllm", "0.26.0", plain, "gpu", 4, batch=frozenset({"allowed_token_ids"}), env=v1
    )
    sharp = shipped["vllm-0.26-triton-topp-sharp-rows"]
    assert sharp.covers("vllm", "0.26.0", SamplingSpec(temperature=0.2, top_p=0.5), "gpu", 8)
    assert not sharp.covers("vllm", "0.26.0", SamplingSpec(temperature=0.2, top_p=0.5), "gpu", 4)  # PyTorch path
    assert not sharp.covers("vllm", "0.26.0", SamplingSpec(temperature=1.0, top_p=0.5), "gpu", 8)


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        ('kind = "divergence"\nwhen = "__import__(\'os\')"', "uses Call"),
        ('kind = "divergence"\nwhen = "temprature < 1"', "names 'temprature'"),
        ('kind = "divergence"\nwhen = "top_p <"', "is not an expression"),
        ('kind = "oops"', "kind = 'oops'"),
        ("", "a crash finding needs match"),
    ],
)
def test_bad_findings_file_is_one_line(tmp_path: Path, entry: str, needle: str) -> None:
    path = tmp_path / "f.toml"
    path.write_text(f'[[finding]]\nid = "x"\nengine = "vllm"\nversions = ">=0"\nsummary = "s"\n{entry}\n')
    with pytest.raises(ValueError) as info:
        load_known_findings(path)
    assert needle in str(info.value) and "finding 'x'" in str(info.value) and "\n" not in str(info.value)


def test_shipped_findings_load() -> None:
    ids = {f.id for f in load_known_findings()}
    assert {"vllm-cpu-seeded-split-prefill", "vllm-cpu-model-load-weights"} <= ids


def _run(pytester: pytest.Pytester, when: str) -> pytest.RunResult:
    pytester.makeconftest(
        f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from conformance.engines.registry import register_engine
register_engine("reference-engine", "tests.reference_engine:factory")
"""
    )
    (pytester.path / "m.toml").write_text(
        '[[cell]]\nid = "ref"\nengine = "reference-engine"\ndtype = "float32"\nlogprobs_mode = "processed_logprobs"\n'
    )
    (pytester.path / "f.toml").write_text(
        f'[[finding]]\nid = "planted-divergence"\nkind = "divergence"\nengine = "reference-engine"\n'
        f'versions = ">=0.0"\nsummary = "a planted divergence"\nwhen = "{when}"\n'
    )
    # A temperature-blind ('raw') trainer against processed values: semantic failures wherever T != 1.
    return pytester.runpytest_subprocess(
        "-p",
        "conformance.plugin",
        "--pyargs",
        "conformance.suite",
        "-m",
        "parity",
        "--parity-matrix",
        "m.toml",
        "--parity-findings",
        "f.toml",
        "-k",
        "test_logprobs_match_contract",
        "--parity-trainer",
        "raw",
        "--parity-examples",
        "6",
        "--parity-shrink",
        "false",
        "--parity-device",
        "cpu",
        "-p",
        "no:cacheprovider",
        "-rx",
    )


def test_covered_divergence_xfails_and_uncovered_fails(pytester: pytest.Pytester) -> None:
    covered = _run(pytester, "True")
    covered.assert_outcomes(xfailed=1)
    assert "known engine finding planted-divergence: a planted divergence" in covered.stdout.str()
    uncovered = _run(pytester, "temperature > 100")
    uncovered.assert_outcomes(failed=1)
    assert "FAILED [layer:" in uncovered.stdout.str()


def _run_crashing(pytester: pytest.Pytester, fatal: bool) -> tuple[pytest.RunResult, int]:
    """The semantic family on an engine that dies at every request (its crash line 40 lines above the log's
    end), with a known finding matching that line; returns the run and how often the engine was started."""
    from tests.crashing_engine import NEEDLE

    pytester.makeconftest(
        f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from conformance.engines.registry import register_engine
register_engine("crashing-engine", "tests.crashing_engine:factory")
"""
    )
    starts = pytester.path / "starts.txt"
    (pytester.path / "m.toml").write_text(
        '[[cell]]\nid = "crash"\nengine = "crashing-engine"\ndtype = "float32"\nlogprobs_mode = "processed_logprobs"\n'
        f'families = ["semantic"]\nenv = {{ CRASHING_ENGINE_STARTS = "{starts}" }}\n'
    )
    (pytester.path / "f.toml").write_text(
        f'[[finding]]\nid = "planted-crash"\nengine = "crashing-engine"\nversions = ">=1,<2"\nsummary = "dies"\n'
        f'match = "{NEEDLE}"\nfatal = {str(fatal).lower()}\n'
    )
    result = pytester.runpytest_subprocess(
        "-p",
        "conformance.plugin",
        "--pyargs",
        "conformance.suite",
        "-m",
        "parity",
        "--parity-matrix",
        "m.toml",
        # 12 cases = 3 examples of 4 (plugin.fixture.CASES_PER_EXAMPLE): three engine calls per property
        "--parity-findings",
        "f.toml",
        "--parity-examples",
        "12",
        "--parity-device",
        "cpu",
        "-p",
        "no:cacheprovider",
        "-rx",
    )
    return result, len(starts.read_text().splitlines()) if starts.exists() else 0


def test_fatal_crash_blocks_the_cell_and_xfails_its_tests(pytester: pytest.Pytester) -> None:
    """A known crash matched in the call's whole log (not the 25-line tail) xfails every semantic test naming
    the finding; marked fatal, the engine starts once for the whole cell; not fatal, each crash restarts it."""
    from tests.crashing_engine import LOG, NEEDLE

    assert NEEDLE in LOG and NEEDLE not in "\n".join(LOG.splitlines()[-25:])  # only the whole log names it
    fatal, fatal_starts = _run_crashing(pytester, fatal=True)
    outcomes = fatal.parseoutcomes()
    assert outcomes.get("xfailed") == 3 and not outcomes.get("failed") and not outcomes.get("passed"), outcomes
    assert fatal.stdout.str().count("known engine finding planted-crash stopped every check") == 3
    assert fatal_starts == 1, f"a fatal finding's engine was started {fatal_starts} times"
    plain, plain_starts = _run_crashing(pytester, fatal=False)
    outcomes = plain.parseoutcomes()
    assert outcomes.get("xfailed") == 3 and not outcomes.get("failed") and not outcomes.get("passed"), outcomes
    assert plain_starts >= 9, f"a non-fatal finding restarts the engine per crash (3 per test): {plain_starts} starts"


def test_an_engine_that_cannot_start_ends_the_test_as_its_finding() -> None:
    """``parity.engine`` for a cell whose engine cannot start: xfail naming a known crash finding (the GPU run of
    session 5 failed the weight-update tests of the CUDA-IPC cell, whose start is the known ray finding), a
    clear failure naming the engine otherwise."""
    from _pytest.outcomes import Failed, XFailed

    from conformance.engines.base import EngineFailure
    from conformance.plugin.fixture import Parity
    from conformance.report.recorder import EngineFailureRecord

    ray = KnownFinding(
        id="ray", engine="vllm", versions=">=0.26,<0.27", summary="imports ray", match="No module named 'ray'"
    )

    class Runner:
        def __init__(self, reason: str) -> None:
            self.reason = reason

        @property
        def engine(self) -> None:
            raise EngineFailure(self.reason)

        def known_finding(self, failure: EngineFailure) -> KnownFinding | None:
            return match_finding("vllm", "0.26.0", failure.finding_text, [ray])

        def engine_failure(self, params: str, failure: EngineFailure, test: str = "") -> EngineFailureRecord:
            known = self.known_finding(failure)
            return EngineFailureRecord("c", params, failure.reason, "", known.id if known else None)

    with pytest.raises(XFailed, match="known engine finding ray"):
        _ = Parity(Runner("cell c: ModuleNotFoundError: No module named 'ray'"), None, None, "t").engine  # type: ignore[arg-type]
    with pytest.raises(Failed, match="something else"):
        _ = Parity(Runner("cell c: something else"), None, None, "t").engine  # type: ignore[arg-type]


def test_a_covered_example_is_not_a_failure_to_shrink() -> None:
    """Inside ``parity.given`` a check a known finding covers ends its example only: hypothesis goes on (no
    shrinking toward examples the finding does not cover, which made the GPU run's batch-composition test a
    FlakyFailure), and the test xfails once the property has run."""
    from _pytest.outcomes import XFailed
    from hypothesis import settings
    from hypothesis import strategies as st

    from conformance.plugin.fixture import Parity

    seen: list[int] = []
    parity = Parity(None, settings(max_examples=20, database=None), None, "t")  # type: ignore[arg-type]

    @parity.given(value=st.integers(0, 100))
    def property_(value: int) -> None:
        seen.append(value)
        if value > 50:
            pytest.xfail(f"known engine finding f: {value}")

    with pytest.raises(XFailed, match="known engine finding f"):
        property_()
    assert len(seen) >= 20  # every example ran: nothing was shrunk
