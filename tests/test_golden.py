"""Golden tensors: file format, manifest, atomic writes and one-line errors (no engine); the committed
goldens cover every CPU-matrix cell of the golden family; a perturbed golden value and corrupted golden
bytes both fail with clear messages (one real engine from the shared pool)."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from conformance.golden.store import (
    GOLDEN_CASES,
    MANIFEST,
    GoldenCase,
    GoldenError,
    GoldenStore,
    atomic_write_bytes,
    decode_case,
    encode_case,
    file_for,
    model_hash,
    spec_from_kwargs,
)
from conformance.suite.test_golden import compatibility

REPO_GOLDEN = Path(__file__).resolve().parents[1] / "golden"


def _case() -> GoldenCase:
    return GoldenCase(
        spec=GOLDEN_CASES["t0.8-topk20"],
        prompts=[(1, 5, 9), (1, 7)],
        completions=[[10, 11], [12, 13, 14]],
        sampled=[[-0.5, -1.25], [-0.125, -2.0, -3.5]],
        topk=[[{20: -0.75}, {21: -1.5, 22: float("-inf")}], [{}, {23: -2.5}, {24: -3.75}]],
    )


def _info() -> dict[str, Any]:
    return {"model_sha256": "abc", "dtype": "float32", "versions": {"vllm": "0.0-test"}}


def test_encode_decode_round_trip() -> None:
    case = _case()
    back = decode_case(encode_case(case), "<mem>")
    assert back.spec == case.spec
    assert back.prompts == case.prompts and back.completions == case.completions
    assert back.sampled == case.sampled
    assert back.topk == case.topk


@pytest.mark.parametrize("name", list(GOLDEN_CASES))
def test_spec_round_trip(name: str) -> None:
    spec = GOLDEN_CASES[name]
    assert spec_from_kwargs(spec.to_kwargs()) == spec


def test_store_write_then_read(tmp_path: Path) -> None:
    store = GoldenStore(tmp_path)
    path = store.write("m", "c", "greedy", _case(), _info())
    assert path == file_for(tmp_path, "m", "c", "greedy") and path.is_file()
    case, entry = store.read("m", "c", "greedy", {"model_sha256": "abc", "dtype": "float32"})
    assert case.completions == _case().completions
    assert entry["versions"]["vllm"] == "0.0-test" and len(entry["sha256"]) == 64
    assert list(store.entries_for("m", "c")) == ["greedy"]
    assert not [p for p in tmp_path.rglob("*.tmp")], "no temp files left behind"


def test_atomic_write_keeps_old_file_on_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "x.bin"
    atomic_write_bytes(target, b"old")

    def crash(src: str, dst: Any) -> None:
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"], "the temp file is removed"


def _one_line(exc: pytest.ExceptionInfo[GoldenError]) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_missing_file_is_one_line_naming_it(tmp_path: Path) -> None:
    store = GoldenStore(tmp_path)
    path = store.write("m", "c", "greedy", _case(), _info())
    path.unlink()
    with pytest.raises(GoldenError) as exc:
        store.read("m", "c", "greedy", {})
    assert str(path) in _one_line(exc) and "missing" in str(exc.value)


def test_corrupt_bytes_are_one_line_naming_the_file(tmp_path: Path) -> None:
    store = GoldenStore(tmp_path)
    path = store.write("m", "c", "greedy", _case(), _info())
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(GoldenError) as exc:
        store.read("m", "c", "greedy", {})
    assert str(path) in _one_line(exc) and "corrupt" in str(exc.value)


def test_incompatible_golden_is_one_line(tmp_path: Path) -> None:
    store = GoldenStore(tmp_path)
    store.write("m", "c", "greedy", _case(), _info())
    with pytest.raises(GoldenError) as exc:
        store.read("m", "c", "greedy", {"dtype": "bfloat16"})
    assert "incompatible" in _one_line(exc) and "dtype" in str(exc.value) and "--parity-record-golden" in str(exc.value)


def test_unreadable_manifest_is_one_line(tmp_path: Path) -> None:
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(GoldenError) as exc:
        GoldenStore(tmp_path).manifest()
    assert MANIFEST in _one_line(exc)


def _golden_cells(cpu_cells: dict[str, Any]) -> list[Any]:
    return [c for c in cpu_cells.values() if c.runs("golden") and c.model == "bundled"]


def test_committed_goldens_cover_the_cpu_matrix(cpu_cells: dict[str, Any], bundled_model: Path) -> None:
    """Every CPU cell that runs the golden family has every case, intact and compatible: CI never skips."""
    cells = _golden_cells(cpu_cells)
    assert cells, "no CPU cell runs the golden family"
    store = GoldenStore(REPO_GOLDEN)
    digest = model_hash(bundled_model)
    for cell in cells:
        for name in GOLDEN_CASES:
            case, _ = store.read(bundled_model.name, cell.id, name, compatibility(cell, digest))
            assert case.spec == GOLDEN_CASES[name]
    size = sum(p.stat().st_size for p in REPO_GOLDEN.rglob("*") if p.is_file())
    assert size < 200_000, f"committed goldens take {size} bytes; keep them small"


# -- with a real engine -------------------------------------------------------------------------------


@pytest.mark.selftest
def test_perturbed_golden_value_fails_with_clear_message(make_runner: Any, bundled_model: Path, tmp_path: Path) -> None:
    """A golden value moved by 0.01 nat (100x the fp32 cell's bound) fails, naming the token and the drift."""
    from conformance.golden.replay import verify_case

    runner = make_runner("fp32-processed")
    store = GoldenStore(REPO_GOLDEN)
    golden, entry = store.read(bundled_model.name, "fp32-processed", "t0.8-topk20", {})
    clean = verify_case(runner, "t0.8-topk20", golden, entry, {"vllm": "test"})
    assert clean.passed, clean.explain()
    sampled = [list(s) for s in golden.sampled]
    sampled[1][5] += 0.01
    perturbed = dataclasses.replace(golden, sampled=sampled)
    verdict = verify_case(runner, "t0.8-topk20", perturbed, entry, {"vllm": "test"})
    assert not verdict.passed
    assert not verdict.golden.passed and verdict.reference.passed
    text = verdict.explain()
    assert "FAILED" in text and "drift against the golden values" in text
    assert "seq 1 pos 5" in text and "max |Δ| 0.01" in text, text
    assert math.isclose(verdict.golden.metrics.max_abs, 0.01, rel_tol=1e-3)


def test_corrupted_golden_bytes_fail_in_a_session(pytester: pytest.Pytester, tmp_path: Path) -> None:
    """A flipped byte in a committed golden file: the suite's golden test fails with one line naming the
    file. The hash is checked before the engine is first used, so no engine starts."""
    golden = tmp_path / "golden"
    shutil.copytree(REPO_GOLDEN, golden)
    path = golden / "pystdlib-llama" / "fp32-processed" / "greedy.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    result = pytester.runpytest_subprocess(
        "-p",
        "conformance.plugin",
        "--pyargs",
        "conformance.suite.test_golden",
        "-p",
        "no:cacheprovider",
        "--parity-cells",
        "fp32-processed",
        "--parity-golden-dir",
        str(golden),
        "-k",
        "greedy",
    )
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    lines = [line for line in out.splitlines() if "corrupt golden file" in line]
    assert lines and str(path) in lines[0], out
    assert "Traceback" not in out
