"""conformance/repro.py: the upstream reproduction script.

Without an engine: the written script imports no kit module, and its ``expected`` function (the contract's
steps as plain torch, only those the parameters use) equals :func:`conformance.contract.processed_distribution`
for every logprobs mode over hypothesis-drawn parameters. With a real engine (selftest): see
tests/test_selftest_diagnosis.py, which executes a script written by a failing check.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conformance.contract import mode_values, processed_distribution
from conformance.repro import STEP_SNIPPETS, engine_arguments, render_repro, write_repro
from conformance.spec import LOGPROBS_MODES, LogprobsMode, SamplingSpec, TokenContext
from conformance.strategies import Vocabulary, sampling_specs

VOCAB = 40
EOS = VOCAB - 1
VOCABULARY = Vocabulary(size=VOCAB, eos_token_id=EOS, words=("ab", "cd"))


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(one_torch_thread: None) -> None:
    """Tiny tensors: see tests/conftest.py."""


def _render(spec: SamplingSpec, mode: LogprobsMode, context: TokenContext, prompt: tuple[int, ...], **kw: Any) -> str:
    return render_repro(
        title="unit test",
        what="",
        model_path="/nonexistent/model",
        engine_kwargs=kw.get("engine_kwargs", {"dtype": "float32"}),
        env={},
        mode=mode,
        bound=1e-4,
        requests=[(prompt, spec)],
        contexts=[context],
    )


def _expected_fn(text: str) -> Any:
    namespace: dict[str, Any] = {"__name__": "repro_under_test"}
    exec(compile(text, "repro.py", "exec"), namespace)  # noqa: S102 - our own generated script, env={}
    return namespace


def _context(spec: SamplingSpec, prompt: tuple[int, ...]) -> TokenContext:
    words = ((prompt[-1], 5), (7,)) if spec.bad_words else ()
    return TokenContext(prompt, frozenset({EOS, *spec.stop_token_ids}), words)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=sampling_specs(VOCABULARY, max_tokens=6), mode=st.sampled_from(LOGPROBS_MODES), seed=st.integers(0, 2**16))
def test_script_expected_equals_the_contract(spec: SamplingSpec, mode: LogprobsMode, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randn(spec.max_tokens, VOCAB, generator=gen) * 2.5
    prompt = tuple(torch.randint(0, 10, (9,), generator=gen).tolist())
    output = torch.randint(0, 10, (spec.max_tokens,), generator=gen).tolist()
    context = _context(spec, prompt)
    namespace = _expected_fn(_render(spec, mode, context, prompt))
    got = namespace["expected"](raw, list(prompt), output, namespace["REQUESTS"][0])
    dist = processed_distribution(raw, output, spec, context)
    want = mode_values(dist, raw, mode)
    assert torch.equal(torch.isfinite(got), torch.isfinite(want)), spec
    finite = torch.isfinite(want)
    if finite.any():  # fp32 rounding relative to the largest scaled logit (thousands at T ~ 0.01)
        scale = float(dist.scaled[torch.isfinite(dist.scaled)].abs().max())
        assert float((got[finite] - want[finite]).abs().max()) <= 1e-5 + 4e-7 * scale, spec


def test_script_imports_nothing_of_the_kit_and_only_needed_steps() -> None:
    spec = SamplingSpec(temperature=0.7, top_p=0.5, min_p=0.5, seed=3, max_tokens=2)
    text = _render(
        spec,
        "processed_logprobs",
        TokenContext((1, 2, 3), frozenset({EOS})),
        (1, 2, 3),
        engine_kwargs={"dtype": "float32", "weight_transfer_config": {"backend": "parity-host"}},
    )
    imported = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"math", "os", "torch", "vllm", "transformers"}, imported
    assert "conformance" not in text and "parity-host" not in text
    assert "# step 8: min_p" in text and "# step 10: top_p" in text
    for name in ("top_k", "logit_bias", "repetition_penalty", "bad_words", "allowed_token_ids"):
        assert STEP_SNIPPETS[name].splitlines()[0].strip() not in text, name
    namespace = _expected_fn(text)
    assert namespace["REQUESTS"][0]["sampling"] == {
        "temperature": 0.7,
        "top_p": 0.5,
        "min_p": 0.5,
        "max_tokens": 2,
        "seed": 3,
        "logprobs": 0,
    }
    assert namespace["BOUND"] == 1e-4 and namespace["ENGINE_KWARGS"] == {"dtype": "float32"}


def test_write_repro_names_the_file_and_keeps_int_bias_keys(tmp_path: Path) -> None:
    spec = SamplingSpec(temperature=0.7, logit_bias=((13, 3.0),), max_tokens=3)
    path = write_repro(
        tmp_path / "out",
        cell="fp32-processed",
        test="tests/x.py::test_a[fp32]",
        title="t",
        what="w",
        model_path="/m",
        engine_kwargs={"dtype": "float32"},
        env={},
        mode="processed_logprobs",
        bound=1e-4,
        requests=[((1, 2), spec)],
        contexts=[TokenContext((1, 2), frozenset({EOS}))],
    )
    assert path.parent == tmp_path / "out" and path.name.startswith("repro-fp32-processed-test-a-fp32-")
    text = path.read_text()
    assert f"python {path.name}" in text
    assert _expected_fn(text)["REQUESTS"][0]["sampling"]["logit_bias"] == {13: 3.0}
    assert engine_arguments({"weight_transfer_config": {}, "dtype": "float32"}) == {"dtype": "float32"}
    assert math.isfinite(_expected_fn(text)["BOUND"])
