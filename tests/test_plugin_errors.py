"""Bad input gives a clear one-line error, never a traceback from deep inside (plugin end to end)."""

from __future__ import annotations

import pytest

SUITE = ("-p", "conformance.plugin", "--pyargs", "conformance.suite", "-m", "parity", "-p", "no:cacheprovider")


def _error_lines(result: pytest.RunResult) -> list[str]:
    return [line for line in result.stderr.lines + result.stdout.lines if line.startswith("ERROR: ")]


def _assert_one_line_usage_error(result: pytest.RunResult, *needles: str) -> None:
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str() + result.stderr.str()
    lines = _error_lines(result)
    assert len(lines) == 1, lines
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in result.stderr.str() + result.stdout.str()


def test_missing_model_path(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess(*SUITE, "--parity-model", "/nonexistent/model")
    _assert_one_line_usage_error(result, "--parity-model", "/nonexistent/model", "config.json")


def test_unknown_matrix_key(pytester: pytest.Pytester) -> None:
    path = pytester.path / "m.toml"
    path.write_text('[[cell]]\nid = "a"\ndtype = "float32"\nlogprobs_mode = "raw_logprobs"\nprefix_cache = true\n')
    result = pytester.runpytest_subprocess(*SUITE, "--parity-matrix", str(path))
    _assert_one_line_usage_error(result, "m.toml", "cell 'a'", "unknown key 'prefix_cache'")


def test_unparsable_toml(pytester: pytest.Pytester) -> None:
    path = pytester.path / "broken.toml"
    path.write_text("[[cell]\nid = ")
    result = pytester.runpytest_subprocess(*SUITE, "--parity-matrix", str(path))
    _assert_one_line_usage_error(result, "broken.toml", "not valid TOML")


def test_unknown_cell_selection(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess(*SUITE, "--parity-cells", "fp64-magic")
    _assert_one_line_usage_error(result, "no cell named 'fp64-magic'")


def test_bad_trainer_semantics(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess(*SUITE, "--parity-trainer", "logits")
    _assert_one_line_usage_error(result, "--parity-trainer", "processed")


def test_cell_vllm_rejects_is_an_engine_failure(pytester: pytest.Pytester) -> None:
    """max_model_len beyond the model's 1024 positions: vLLM refuses the config; the test fails with the
    engine layer, a one-line reason and the log tail, without a Python traceback."""
    path = pytester.path / "reject.toml"
    path.write_text(
        '[[cell]]\nid = "too-long"\ndtype = "float32"\nlogprobs_mode = "raw_logprobs"\nmax_model_len = 100000\n'
    )
    result = pytester.runpytest_subprocess(
        *SUITE, "--parity-matrix", str(path), "-k", "test_logprobs_match_contract", "--parity-examples", "3"
    )
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    headline = [line for line in out.splitlines() if "ENGINE FAILURE [layer: engine] in cell 'too-long'" in line]
    assert headline, out
    assert "vLLM rejected or failed to start the engine" in headline[0]
    assert "max_model_len" in headline[0]  # the reason names what vLLM objected to
    assert "Traceback" not in out


def test_plugin_keeps_unrelated_sessions_light(pytester: pytest.Pytester) -> None:
    """A repo that installs the kit pays nothing heavy in sessions without engine-backed tests: the plugin's
    configure step must not import torch, transformers or vLLM."""
    pytester.makepyfile(
        test_light="""
import sys

def test_no_heavy_imports():
    heavy = sorted(m for m in ("torch", "transformers", "vllm") if m in sys.modules)
    assert not heavy, heavy
"""
    )
    result = pytester.runpytest_subprocess("-p", "conformance.plugin", "-p", "no:cacheprovider", "test_light.py")
    assert result.ret == 0, result.stdout.str() + result.stderr.str()


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("--parity-diagnose", "maybe"), ("--parity-diagnose", "'maybe'", "on or off")),
        (("--parity-diagnose-calls", "0"), ("--parity-diagnose-calls", "positive integer")),
        (("--parity-diagnose-calls", "many"), ("--parity-diagnose-calls", "'many'")),
    ],
)
def test_bad_diagnosis_options(pytester: pytest.Pytester, args: tuple[str, ...], needles: tuple[str, ...]) -> None:
    result = pytester.runpytest_subprocess(*SUITE, *args)
    _assert_one_line_usage_error(result, *needles)


def test_repro_dir_that_is_a_file(pytester: pytest.Pytester) -> None:
    path = pytester.path / "not-a-dir"
    path.write_text("x")
    result = pytester.runpytest_subprocess(*SUITE, "--parity-repro-dir", str(path))
    _assert_one_line_usage_error(result, "--parity-repro-dir", "not a directory")


def test_diagnosis_options_resolve(pytester: pytest.Pytester) -> None:
    """The ini keys reach the fixture's settings (parity_diagnose = off, calls, repro dir)."""
    pytester.makeini("[pytest]\nparity_diagnose = off\nparity_diagnose_calls = 7\nparity_repro_dir = repros\n")
    pytester.makepyfile(
        test_cfg="""
def test_cfg(pytestconfig):
    from conformance.plugin import CONFIG_KEY
    settings = pytestconfig.stash[CONFIG_KEY].diagnosis
    assert (settings.enabled, settings.max_calls, settings.repro_dir.name) == (False, 7, "repros"), settings
"""
    )
    result = pytester.runpytest_subprocess("-p", "conformance.plugin", "-p", "no:cacheprovider", "test_cfg.py")
    assert result.ret == 0, result.stdout.str() + result.stderr.str()


def test_bad_engine_start_switch(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARITY_ENGINE_START", "fork")
    result = pytester.runpytest_subprocess(*SUITE)
    _assert_one_line_usage_error(result, "PARITY_ENGINE_START='fork'", "zygote, spawn")
