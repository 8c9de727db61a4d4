"""Contract test: our rollout engine returns the logprobs our trainer computes.

The kit's main semantic property runs here under our trainer (parity_trainer_fn in pyproject.toml); the
second test shows the contract catches a trainer bug on the same engine.
"""

from __future__ import annotations

from typing import Any

import my_trainer
import pytest

from conformance import Request, SamplingSpec, assert_logprob_parity
from conformance.suite.test_semantics import test_logprobs_match_contract  # noqa: F401 - collected here

pytestmark = pytest.mark.parity


def test_planted_trainer_bug_is_caught(parity_runner: Any, parity_model_path: Any) -> None:
    spec = SamplingSpec(temperature=0.7, max_tokens=8, seed=0, logprobs=2)
    requests = [Request(parity_runner.prompts.ids[i], spec) for i in (0, 1, 2)]
    engine = parity_runner.handle.engine
    samples = engine.generate(requests)
    # our real trainer agrees with the engine on these samples ...
    assert_logprob_parity(
        engine,
        my_trainer.trainer_logits,
        requests,
        samples=samples,
        cell=parity_runner.cell,
        model_path=parity_model_path,
    )
    # ... and a misaligned one does not
    with pytest.raises(AssertionError, match=r"logprob parity FAILED \[layer: semantic\]"):
        assert_logprob_parity(
            engine,
            my_trainer.trainer_logits_off_by_one,
            requests,
            samples=samples,
            cell=parity_runner.cell,
            model_path=parity_model_path,
        )
