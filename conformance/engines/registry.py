"""Engines by name: a cell's ``engine`` key (and ``--parity-engine``) names a factory registered here.

A factory is ``factory(cell, model_path) -> Engine``. The kit registers its two vLLM adapters; other
packages register theirs under the entry-point group ``logprob_parity.engines`` (``name =
"package.module:factory"``), or a test or conftest calls :func:`register_engine`. Nothing is imported
until a name is resolved, so the registry is cheap to consult at configure time (matrix validation).

Adding an engine = one module implementing :class:`~conformance.engines.base.Engine` (and whatever
capability protocols it supports) + one registry line (an entry point or a :func:`register_engine` call).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from conformance.engines.base import Engine
    from conformance.matrix import Cell

EngineFactory = Callable[["Cell", Path], "Engine"]
"""``factory(cell, model_path) -> Engine``: starts the engine under test for one cell."""

ENTRY_POINT_GROUP = "logprob_parity.engines"

_BUILTIN: dict[str, str] = {
    "vllm": "conformance.engines.vllm_offline:VllmOfflineEngine",
    "vllm-server": "conformance.engines.vllm_server:VllmServerEngine",
}
_registered: dict[str, EngineFactory | str] = {}


class UnknownEngine(KeyError):
    """An engine name nobody registered; ``str()`` is one line listing the known names."""

    def __str__(self) -> str:
        return str(self.args[0])


def register_engine(name: str, factory: EngineFactory | str) -> None:
    """Make ``name`` resolve to ``factory`` (a callable or a ``module:attribute`` string); replaces an
    earlier registration of the same name."""
    _registered[name] = factory


def unregister_engine(name: str) -> None:
    """Forget a :func:`register_engine` registration (built-ins and entry points stay)."""
    _registered.pop(name, None)


def _entry_points() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def engine_names() -> list[str]:
    """Every name that resolves: built-ins, entry points and :func:`register_engine` calls."""
    return sorted({*_BUILTIN, *_entry_points(), *_registered})


def _load(spec: str, name: str) -> EngineFactory:
    module, _, attribute = spec.partition(":")
    target: object = importlib.import_module(module)
    for part in attribute.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"engine {name!r}: {spec} is not callable")
    return target


def engine_factory(name: str) -> EngineFactory:
    """The factory registered as ``name``; :class:`UnknownEngine` (one line) when there is none."""
    for source in (_registered, _entry_points(), _BUILTIN):
        if name in source:
            found = source[name]
            return _load(found, name) if isinstance(found, str) else found
    raise UnknownEngine(f"unknown engine {name!r} (registered: {', '.join(engine_names())})")
