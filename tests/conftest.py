"""Fixtures for the kit's own tests: real engines for self-tests, shared across the session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from conformance.bundled import CPU_MATRIX
from conformance.matrix import Cell, load_matrix

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
    return {c.id: c for c in load_matrix(CPU_MATRIX)}


@pytest.fixture(scope="session")
def kit_session() -> Any:
    """The kit's own :class:`~conformance.session.ParitySession` on the bundled model (fp32 reference on the
    CPU): the same builder the plugin and the benchmarks use."""
    from conformance.session import ParitySession

    return ParitySession(device="cpu")


@pytest.fixture(scope="session")
def bundled_model(kit_session: Any) -> Path:
    return cast(Path, kit_session.model_path())


@pytest.fixture(scope="session")
def bundled_tokenizer(kit_session: Any, bundled_model: Path) -> Any:
    return kit_session.tokenizer(bundled_model)


@pytest.fixture(scope="session")
def bundled_reference(kit_session: Any, bundled_model: Path) -> Any:
    return kit_session.reference(bundled_model)


@pytest.fixture(scope="session")
def bundled_prompts(kit_session: Any, bundled_model: Path) -> Any:
    return kit_session.prompts(bundled_model)


@pytest.fixture(scope="session")
def engines(cpu_cells: dict[str, Cell], kit_session: Any) -> Iterator[Any]:
    """``engines(cell_id)`` -> a started :class:`EngineHandle` on the bundled model, reused all session."""
    handles: dict[str, Any] = {}

    def get(cell_id: str) -> Any:
        if cell_id not in handles:
            handles[cell_id] = kit_session.handle(cpu_cells[cell_id])
        return handles[cell_id]

    yield get
    for handle in handles.values():
        handle.close()


@pytest.fixture(scope="session")
def make_runner(engines: Any, kit_session: Any) -> Any:
    """``make_runner(cell_id, trainer=None, handle=None)`` -> a ParityRunner on the bundled model."""
    from conformance.runner import ParityRunner

    def make(cell_id: str, trainer: str | None = None, handle: Any = None) -> ParityRunner:
        runner = kit_session.runner(
            handle.cell if handle is not None else engines(cell_id).cell,
            handle if handle is not None else engines(cell_id),
        )
        runner.trainer = trainer
        return cast(ParityRunner, runner)

    return make


SELFTEST_ENGINE_GROUP = "selftest-engines"
"""The pytest-xdist group of every self-test that uses the session's shared engines (``engines``): one
worker holds them, so ``pytest -n 2 --dist loadgroup`` starts each of them once."""


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the groups into the node ids
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "engines" in getattr(item, "fixturenames", ()) and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(SELFTEST_ENGINE_GROUP))
