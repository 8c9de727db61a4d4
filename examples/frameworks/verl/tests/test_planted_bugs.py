"""Planted trainer bugs the contract must catch.

* ``trainer_logits_off_by_one`` (labels not rolled): in-process, on the session's engine, the
  kit must fail at the semantic layer.
* A trainer that forgets the temperature (an actor that never divides by ``rollout.temperature``:
  ``log_softmax(logits)`` at any rollout temperature), declared through the CLI as ``--parity-trainer raw``: a nested pytest
  session running the temperature-0.6 row must exit non-zero with the objective layer naming the temperature.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trainer_fn

from conformance import Request, SamplingSpec, assert_logprob_parity

HERE = Path(__file__).resolve().parents[1]


@pytest.mark.parity
def test_off_by_one_trainer_is_caught(parity_runner: Any, parity_model_path: Path) -> None:
    if parity_runner.cell.logprobs_mode != "processed_logprobs":
        pytest.skip("one cell is enough")
    spec = SamplingSpec(temperature=0.6, max_tokens=8, seed=0, logprobs=2)
    requests = [Request(parity_runner.prompts.ids[i], spec) for i in (0, 1, 2)]
    engine = parity_runner.handle.engine
    samples = engine.generate(requests)
    assert_logprob_parity(
        engine,
        trainer_fn.trainer_logits,
        requests,
        samples=samples,
        cell=parity_runner.cell,
        trainer="temperature-only",
        model_path=parity_model_path,
    )
    with pytest.raises(AssertionError, match=r"logprob parity FAILED \[layer: semantic\]"):
        assert_logprob_parity(
            engine,
            trainer_fn.trainer_logits_off_by_one,
            requests,
            samples=samples,
            cell=parity_runner.cell,
            trainer="temperature-only",
            model_path=parity_model_path,
        )


@pytest.mark.parity  # starts an engine (in the nested run): `-m "not parity"` leaves it out
@pytest.mark.slow
def test_trainer_that_forgets_the_temperature_fails_the_run(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "PARITY_FRAMEWORK_RESULTS")}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "tests/test_verl_matrix.py",
        "-k",
        "temperature-0.6",
        "-q",
        "--parity-cells",
        "verl-fp32",
        "--parity-trainer",
        "raw",
        "-p",
        "no:cacheprovider",
    ]
    result = subprocess.run(cmd, cwd=HERE, env=env, check=False, capture_output=True, text=True, timeout=900)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out[-3000:]
    assert "logprob parity FAILED [layer: objective]" in out, out[-3000:]
    assert "a 'raw' trainer scores a different distribution than the sampler used: temperature 0.6" in out, out[-3000:]
