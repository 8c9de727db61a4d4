"""Fixtures for the kit's own tests: real engines for self-tests, shared across the session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conformance.matrix import Cell, load_matrix
from conformance.plugin import DEFAULT_MATRIX, DEFAULT_PROMPTS

pytest_plugins = ["pytester"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors: OpenMP fan-out only costs time (badly so on a busy 2-core machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def cpu_cells() -> dict[str, Cell]:
    """The shipped CPU matrix's cells by id."""
    return {c.id: c for c in load_matrix(DEFAULT_MATRIX)}


@pytest.fixture(scope="session")
def bundled_model() -> Path:
    from conformance.models import BUNDLED_MODEL

    return BUNDLED_MODEL


@pytest.fixture(scope="session")
def bundled_tokenizer(bundled_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundled_model)


@pytest.fixture(scope="session")
def bundled_reference(bundled_model: Path) -> Any:
    from conformance.reference import HFReference

    return HFReference(bundled_model)


@pytest.fixture(scope="session")
def bundled_prompts(bundled_tokenizer: Any) -> Any:
    from conformance.runner import PromptSet

    return PromptSet.load(DEFAULT_PROMPTS, bundled_tokenizer)


@pytest.fixture(scope="session")
def engines(cpu_cells: dict[str, Cell], bundled_model: Path) -> Iterator[Any]:
    """``engines(cell_id)`` -> a started :class:`EngineHandle` on the bundled model, reused all session."""
    from conformance.runner import EngineHandle

    handles: dict[str, EngineHandle] = {}

    def get(cell_id: str) -> EngineHandle:
        if cell_id not in handles:
            handles[cell_id] = EngineHandle(cpu_cells[cell_id], bundled_model)
        return handles[cell_id]

    yield get
    for handle in handles.values():
        handle.close()


@pytest.fixture(scope="session")
def make_runner(engines: Any, bundled_reference: Any, bundled_prompts: Any, bundled_tokenizer: Any) -> Any:
    """``make_runner(cell_id, trainer=None, handle=None)`` -> a ParityRunner on the bundled model."""
    from conformance.runner import ParityRunner

    def make(cell_id: str, trainer: str | None = None, handle: Any = None) -> ParityRunner:
        return ParityRunner(
            handle if handle is not None else engines(cell_id),
            bundled_reference,
            bundled_prompts,
            trainer=trainer,  # type: ignore[arg-type]
            decode=lambda t: bundled_tokenizer.decode([t]),
        )

    return make
