"""Config matrices: the shipped CPU matrix loads, and every bad input is a one-line MatrixError."""

from __future__ import annotations

from pathlib import Path

import pytest

from conformance.matrix import Cell, MatrixError, load_matrix, parse_matrix, select_cells

CPU_MATRIX = Path(__file__).resolve().parents[1] / "conformance" / "fixtures" / "matrices" / "cpu.toml"

GOOD_CELL = 'id = "a"\ndtype = "float32"\nlogprobs_mode = "processed_logprobs"\n'


def _write(tmp_path: Path, text: str, name: str = "m.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _error(path: Path) -> str:
    with pytest.raises(MatrixError) as info:
        load_matrix(path)
    message = str(info.value)
    assert "\n" not in message, f"message is not one line: {message!r}"
    assert str(path) in message, f"message does not name the file: {message!r}"
    return message


def test_shipped_cpu_matrix_loads() -> None:
    cells = load_matrix(CPU_MATRIX)
    ids = [c.id for c in cells]
    assert ids[:4] == ["fp32-processed", "fp32-raw", "bf16-processed", "bf16-processed-head32"]
    # architecture variants run the semantic family only; the chunked cell its opt-in family only
    variants = [c for c in cells if c.model != "bundled"]
    assert len(variants) == 3 and all(c.families == ("semantic",) for c in variants), ids
    chunked = {c.id: c for c in cells}["fp32-processed-chunked"]
    assert chunked.families == ("chunked-prefill",) and chunked.max_num_batched_tokens == 64
    assert not cells[0].runs("chunked-prefill") and chunked.runs("chunked-prefill") and not chunked.runs("semantic")
    by_id = {c.id: c for c in cells}
    assert by_id["fp32-processed"].dtype == "float32"
    assert by_id["fp32-processed"].logprobs_mode == "processed_logprobs"
    assert by_id["fp32-raw"].logprobs_mode == "raw_logprobs"
    assert by_id["bf16-processed"].dtype == "bfloat16"
    assert by_id["bf16-processed-head32"].head_dtype == "float32"
    for cell in cells:
        assert cell.tier == "cpu"
        assert cell.env.get("VLLM_CPU_KVCACHE_SPACE") == "1"  # inherited from [defaults]
        assert cell.source == str(CPU_MATRIX)
        assert cell.purpose
    assert by_id["fp32-processed"].precision == "cpu-float32"
    assert by_id["bf16-processed"].precision == "cpu-bfloat16"
    assert by_id["bf16-processed-head32"].precision == "cpu-bfloat16-head32"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        pytest.param("[[cell]]\n" + GOOD_CELL + "colour = 1\n", "colour", id="unknown-cell-key"),
        pytest.param("[bogus]\nx = 1\n[[cell]]\n" + GOOD_CELL, "bogus", id="unknown-top-level-key"),
        pytest.param("[[cell]]\n" + GOOD_CELL + 'max_model_len = "big"\n', "max_model_len", id="wrong-type"),
        pytest.param("[[cell]]\n" + GOOD_CELL + "enforce_eager = 1\n", "enforce_eager", id="int-for-bool"),
        pytest.param("[[cell]]\n" + GOOD_CELL + "seed = true\n", "seed", id="bool-for-int"),
        pytest.param(
            '[[cell]]\nid = "a"\ndtype = "float64"\nlogprobs_mode = "processed_logprobs"\n', "dtype", id="bad-dtype"
        ),
        pytest.param(
            '[[cell]]\nid = "a"\ndtype = "float32"\nlogprobs_mode = "logprobs"\n', "logprobs_mode", id="bad-mode"
        ),
        pytest.param("[[cell]]\n" + GOOD_CELL + "[cell.tolerance]\nslack = 0.1\n", "slack", id="unknown-tolerance-key"),
        pytest.param("[[cell]]\n" + GOOD_CELL + '[cell.tolerance]\nband = "x"\n', "band", id="bad-tolerance-value"),
        pytest.param('[[cell]]\nid = "a"\ndtype = "float32"\n', "logprobs_mode", id="missing-required"),
        pytest.param("[[cell]]\n" + GOOD_CELL + "max_num_seqs = 0\n", "max_num_seqs", id="non-positive"),
        pytest.param("[[cell]]\n" + GOOD_CELL + "gpus = 0\n", "gpus", id="gpus-non-positive"),
        pytest.param("[[cell]]\n" + GOOD_CELL + 'gpus = "2"\n', "gpus", id="gpus-not-int"),
        pytest.param("[[cell]]\n" + GOOD_CELL + "env = { A = 1 }\n", "env['A']", id="env-not-string"),
        pytest.param(
            '[[cell]]\nid = "Has Space"\ndtype = "float32"\nlogprobs_mode = "raw_logprobs"\n', "id", id="bad-id"
        ),
        pytest.param("[defaults]\ncolour = 1\n[[cell]]\n" + GOOD_CELL, "colour", id="unknown-default-key"),
        pytest.param("[[cell]]\n" + GOOD_CELL + "[[cell]]\n" + GOOD_CELL, "'a'", id="duplicate-id"),
    ],
)
def test_bad_matrix_is_one_line_error_naming_file_and_key(tmp_path: Path, text: str, key: str) -> None:
    message = _error(_write(tmp_path, text))
    assert key in message


def test_bad_value_names_the_cell(tmp_path: Path) -> None:
    text = "[[cell]]\n" + GOOD_CELL + '[[cell]]\nid = "second"\ndtype = "int8"\nlogprobs_mode = "raw_logprobs"\n'
    message = _error(_write(tmp_path, text))
    assert "'second'" in message and "dtype" in message and "int8" in message


def test_duplicate_id_message(tmp_path: Path) -> None:
    message = _error(_write(tmp_path, "[[cell]]\n" + GOOD_CELL + "[[cell]]\n" + GOOD_CELL))
    assert "duplicate" in message


def test_unparsable_toml(tmp_path: Path) -> None:
    message = _error(_write(tmp_path, "[[cell]]\nid = \n"))
    assert "TOML" in message and "line 2" in message


def test_missing_file(tmp_path: Path) -> None:
    message = _error(tmp_path / "nope.toml")
    assert "not found" in message


def test_no_cells(tmp_path: Path) -> None:
    message = _error(_write(tmp_path, '[defaults]\ntier = "cpu"\n'))
    assert "cell" in message


def test_select_cells() -> None:
    cells = load_matrix(CPU_MATRIX)
    assert select_cells(cells, [], "cpu.toml") == cells
    chosen = select_cells(cells, ["fp32-raw", "fp32-processed"], "cpu.toml")
    assert [c.id for c in chosen] == ["fp32-processed", "fp32-raw"]  # matrix order
    with pytest.raises(MatrixError) as info:
        select_cells(cells, ["fp32-raw", "fp64-nope"], str(CPU_MATRIX))
    message = str(info.value)
    assert "\n" not in message
    assert str(CPU_MATRIX) in message and "fp64-nope" in message
    assert "fp32-raw" in message  # lists the known cells


def test_defaults_are_merged_and_tables_combined() -> None:
    data = {
        "defaults": {"tier": "cpu", "env": {"A": "1", "B": "2"}, "tolerance": {"max_abs": 0.5}, "seed": 3},
        "cell": [
            {"id": "x", "dtype": "bfloat16", "logprobs_mode": "processed_logprobs", "env": {"B": "9"}},
            {"id": "y", "dtype": "float32", "logprobs_mode": "raw_logits", "seed": 7, "tolerance": {"band": 0.0}},
        ],
    }
    x, y = parse_matrix(data, "mem.toml")
    assert dict(x.env) == {"A": "1", "B": "9"}
    assert x.seed == 3 and y.seed == 7
    assert x.tolerance.max_abs == 0.5 and x.tolerance.band == 0.25
    assert y.tolerance.max_abs == 0.5 and y.tolerance.band == 0.0


def test_engine_kwargs_always_explicit() -> None:
    cells = load_matrix(CPU_MATRIX)
    extra = parse_matrix(
        {
            "cell": [
                {
                    "id": "tuned",
                    "dtype": "float16",
                    "logprobs_mode": "processed_logits",
                    "max_num_seqs": 4,
                    "enable_prefix_caching": False,
                    "attention_backend": "CPU_ATTN",
                    "engine_kwargs": {"swap_space": 0},
                }
            ]
        },
        "mem.toml",
    )
    for cell in [*cells, *extra]:
        kwargs = cell.engine_kwargs()
        assert kwargs["dtype"] == cell.dtype
        assert kwargs["logprobs_mode"] == cell.logprobs_mode
        assert kwargs["generation_config"] == "vllm"
        assert ("hf_overrides" in kwargs) == (cell.head_dtype is not None)
        if cell.head_dtype is not None:
            assert kwargs["hf_overrides"] == {"head_dtype": cell.head_dtype}
        assert "model" not in kwargs
    by_id = {c.id: c for c in cells}
    assert "hf_overrides" in by_id["bf16-processed-head32"].engine_kwargs()
    assert "hf_overrides" not in by_id["bf16-processed"].engine_kwargs()
    tuned = extra[0].engine_kwargs()
    assert tuned["max_num_seqs"] == 4 and tuned["enable_prefix_caching"] is False
    assert tuned["swap_space"] == 0
    assert tuned["attention_config"] == {"backend": "CPU_ATTN"}
    assert "block_size" not in tuned  # unset optionals are left to vLLM


def test_cell_defaults() -> None:
    cell = Cell(id="c", dtype="float32", logprobs_mode="raw_logprobs")
    kwargs = cell.engine_kwargs()
    assert kwargs["enforce_eager"] is True and kwargs["max_model_len"] == 1024


# ---- regressions of bugs found in review -------------------------------------------------------------


@pytest.mark.parametrize("text", ['cell = ["a"]\n', "cell = [1]\n"], ids=["string", "int"])
def test_non_table_cell_is_matrix_error(tmp_path: Path, text: str) -> None:
    _error(_write(tmp_path, text))


def test_non_table_default_env_is_matrix_error(tmp_path: Path) -> None:
    _error(_write(tmp_path, '[defaults]\nenv = "x"\n[[cell]]\n' + GOOD_CELL + 'env = { A = "1" }\n'))


def test_env_name_with_newline_stays_one_line(tmp_path: Path) -> None:
    _error(_write(tmp_path, "[[cell]]\n" + GOOD_CELL + 'env = { "A\\nB" = 1 }\n'))


def test_engine_kwargs_cannot_override_explicit_keys(tmp_path: Path) -> None:
    """dtype / generation_config in engine_kwargs would desynchronise the tolerance class or let the model's
    generation_config.json change sampling defaults: the matrix rejects them in one line naming both."""
    text = "[[cell]]\n" + GOOD_CELL + '[cell.engine_kwargs]\ndtype = "auto"\ngeneration_config = "auto"\n'
    path = _write(tmp_path, text)
    with pytest.raises(MatrixError) as info:
        load_matrix(path)
    message = str(info.value)
    assert "engine_kwargs may not set dtype, generation_config" in message and "\n" not in message, message


def test_unknown_engine_is_one_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "[[cell]]\n" + GOOD_CELL + 'engine = "sglang"\n')
    with pytest.raises(MatrixError) as info:
        load_matrix(path)
    assert "engine = 'sglang' is not a registered engine (vllm, vllm-server" in str(info.value), str(info.value)


# ---- parallel cells (docs/parallel.md) ------------------------------------------------------------------

GPU_MATRIX = CPU_MATRIX.with_name("gpu.toml")
NVLS_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def test_shipped_parallel_cells() -> None:
    """CPU: TP=2 and PP=2 with one core per rank and the TP=1 step budget pinned (vLLM's CPU default doubles
    with the world size); GPU: the same cells on 2 GPUs with NVLink multicast off."""
    cpu = {c.id: c for c in load_matrix(CPU_MATRIX)}
    for cell_id, key in (
        ("fp32-processed-tp2", "tensor_parallel_size"),
        ("fp32-processed-pp2", "pipeline_parallel_size"),
    ):
        cell = cpu[cell_id]
        kwargs = cell.engine_kwargs()
        assert kwargs[key] == 2 and kwargs["max_num_batched_tokens"] == 4096 and kwargs["max_num_seqs"] == 256, kwargs
        assert cell.env["VLLM_CPU_OMP_THREADS_BIND"] == "0|1" and cell.start_timeout_s == 600 and cell.gpus == 1
    assert cpu["fp32-processed-pp2"].families == ("semantic",)
    assert cpu["fp32-processed-tp2"].families is not None and "semantic" in cpu["fp32-processed-tp2"].families
    gpu = {c.id: c for c in load_matrix(GPU_MATRIX)}
    for cell_id, key in (
        ("gpu-fp32-processed-tp2", "tensor_parallel_size"),
        ("gpu-fp32-processed-pp2", "pipeline_parallel_size"),
    ):
        cell = gpu[cell_id]
        assert cell.tier == "gpu" and cell.gpus == 2 and cell.engine_kwargs()[key] == 2
        assert {k: cell.env.get(k) for k in NVLS_OFF} == NVLS_OFF, cell.env
    assert all(c.gpus == 1 for c in gpu.values() if not c.id.endswith(("-tp2", "-pp2")))


def test_parallel_cells_pair_on_the_tensor_parallel_switch() -> None:
    """fp32-processed vs fp32-processed-tp2 differ in the TP size only (the thread binding, GPU count and the
    pinned budget go with it): an execution-mode pair on every machine; PP=2 pairs with nothing."""
    from conformance.suite.test_execution_modes import switch_pairs

    cells = load_matrix(CPU_MATRIX) + load_matrix(GPU_MATRIX)
    pairs = {(a.id, b.id): switch for a, b, switch in switch_pairs(cells)}
    assert pairs[("fp32-processed", "fp32-processed-tp2")] == "tensor parallel size"
    assert pairs[("gpu-fp32-processed", "gpu-fp32-processed-tp2")] == "tensor parallel size"
    assert (
        pairs[("fp32-processed", "fp32-processed-chunked")] == "chunked prefill budget"
    )  # unchanged by the TP switch sharing its fields
    assert not [p for p in pairs if any(c.endswith("-pp2") for c in p)], pairs


@pytest.mark.parametrize(
    ("available", "count", "reason"),
    [
        (False, 0, "is a GPU cell (tier 'gpu') and torch.cuda.is_available() is False"),
        (True, 1, "needs 2 GPUs and torch.cuda.device_count() is 1"),
    ],
)
def test_two_gpu_cell_skips_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, available: bool, count: int, reason: str
) -> None:
    import torch

    from conformance.plugin import skip_unless_runnable

    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    cell = {c.id: c for c in load_matrix(GPU_MATRIX)}["gpu-fp32-processed-tp2"]
    with pytest.raises(pytest.skip.Exception) as info:
        skip_unless_runnable(cell)
    assert str(info.value) == f"cell gpu-fp32-processed-tp2 {reason}"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    if available:
        skip_unless_runnable(cell)  # two GPUs: runs
