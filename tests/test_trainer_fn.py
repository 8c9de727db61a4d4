"""--parity-trainer-fn / --parity-engine: bad specs are one-line usage errors; a trainer function that
breaks the protocol is a one-line error naming it; a correct one is an exact stand-in for the HF reference."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from conformance.trainer import Reference, SpecError, TrainerFnError, TrainerFnReference, load_object

if TYPE_CHECKING:
    import torch

SUITE = ("-p", "conformance.plugin", "--pyargs", "conformance.suite", "-m", "parity", "-p", "no:cacheprovider")

BAD_SPECS = [
    ("no_colon_here", "expected 'module:function'"),
    ("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
    ("json:no_such_function", "has no attribute 'no_such_function'"),
    ("math:pi", "not callable"),
]


@pytest.mark.parametrize("spec, needle", BAD_SPECS)
def test_load_object_errors(spec: str, needle: str) -> None:
    with pytest.raises(SpecError) as info:
        load_object(spec, "--parity-trainer-fn")
    assert needle in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("option", ["--parity-trainer-fn", "--parity-engine"])
def test_bad_spec_is_one_line_usage_error(pytester: pytest.Pytester, option: str) -> None:
    result = pytester.runpytest_subprocess(*SUITE, option, "no_such_module_xyz:fn")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    lines = [line for line in result.stderr.lines + result.stdout.lines if line.startswith("ERROR: ")]
    assert len(lines) == 1 and option in lines[0] and "no_such_module_xyz" in lines[0], lines
    assert "Traceback" not in result.stderr.str() + result.stdout.str()


def _logits(sequences: list[tuple[list[int], list[int]]]) -> list[object]:
    import torch

    return [torch.zeros(len(c), 32) for _, c in sequences]


def test_protocol_violations_are_one_line() -> None:
    import torch

    cases: list[tuple[Callable[..., Any], str]] = [
        (lambda seqs: _logits(seqs)[:1], "must return a list of 2 tensors"),
        (lambda seqs: [torch.zeros(len(c) + 1, 32) for _, c in seqs], "has shape"),
        (lambda seqs: [torch.zeros(len(c), 31) for _, c in seqs], "has shape"),
        (lambda seqs: [torch.full((len(c), 32), float("-inf")) for _, c in seqs], "non-finite"),
        (lambda seqs: 1 / 0, "raised ZeroDivisionError"),
    ]
    for fn, needle in cases:
        ref = TrainerFnReference(_logits, name="good")
        ref.vocab_size  # noqa: B018 - fixes the vocabulary at 32 from a good call
        ref.fn, ref.name = fn, "my_trainer:bad"
        with pytest.raises(TrainerFnError) as info:
            ref.raw_logits([((1, 2), (3, 4)), ((1,), (5, 6, 7))])
        assert needle in str(info.value) and "my_trainer:bad" in str(info.value), str(info.value)
        assert "\n" not in str(info.value)


def test_model_path_is_passed_and_vocab_read(bundled_model: Path, bundled_reference: Reference) -> None:
    """A trainer function over the same HF model equals the HF reference bit for bit, and satisfies the protocol."""
    seen: list[Path | None] = []

    def trainer(sequences: list[tuple[list[int], list[int]]], model_path: Path | None = None) -> list[torch.Tensor]:
        seen.append(model_path)
        return bundled_reference.raw_logits(sequences)

    ref = TrainerFnReference(trainer, bundled_model, "t")
    assert isinstance(ref, Reference)
    assert ref.vocab_size == bundled_reference.vocab_size
    seqs = [((1, 50, 60), (70, 80)), ((1, 9), (10, 11, 12))]
    ours = ref.raw_logits(seqs)
    theirs = bundled_reference.raw_logits(seqs)
    assert seen == [bundled_model]
    assert all(bool((a == b).all()) for a, b in zip(ours, theirs))
