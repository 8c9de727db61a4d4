"""The engine of one cell as the suite holds it: started on first use, restarted after it died, closed once."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from conformance.engines.base import Engine, EngineFailure
from conformance.engines.registry import EngineFactory, engine_factory

if TYPE_CHECKING:
    from conformance.matrix import Cell
    from conformance.report.recorder import EngineFailureRecord


class EngineHandle:
    """The engine of ``cell`` on ``model_path``, built by ``factory`` (default: the registry's factory
    for ``cell.engine``). A start failure is remembered and re-raised, never retried; an engine that
    reports itself dead is closed and started again on next use, unless it was :meth:`block` ed (a crash
    after which this configuration serves nothing)."""

    def __init__(self, cell: Cell, model_path: Path, factory: EngineFactory | None = None) -> None:
        self.cell = cell
        self.model_path = model_path
        self.factory = factory if factory is not None else engine_factory(cell.engine)
        self.failures: list[EngineFailureRecord] = []
        self._engine: Engine | None = None
        self._start_failure: EngineFailure | None = None
        self._blocked: EngineFailure | None = None
        self._identity: tuple[str, str | None] | None = None
        self.start_seconds = 0.0
        """Wall time spent starting this handle's engines (every start and restart, failed ones included)."""

    @property
    def started(self) -> bool:
        """Whether an engine is running now (no start is attempted)."""
        return self._engine is not None

    @property
    def start_failure(self) -> EngineFailure | None:
        """The failure of the start attempt, if the engine could not start."""
        return self._start_failure

    @property
    def blocked(self) -> EngineFailure | None:
        """The failure this configuration was blocked by (see :meth:`block`), or None."""
        return self._blocked

    def block(self, failure: EngineFailure) -> None:
        """Stop the engine and never start this configuration again: every later use raises an
        :class:`EngineFailure` at once that carries ``failure``'s log (so it matches the same known finding).
        For crashes that kill any request (a known finding marked ``fatal``): restarting would cost an engine
        start per check and fail again."""
        if self._blocked is None:
            self._blocked = EngineFailure(
                f"cell {self.cell.id}: not restarted, this configuration died earlier in the session: "
                + failure.reason.removeprefix(f"cell {self.cell.id}: "),
                failure.log_tail,
                failure.log,
            )
        self.close()

    @property
    def engine(self) -> Engine:
        """The running engine, started on first use."""
        if self._start_failure is not None:
            raise self._start_failure
        if self._blocked is not None:
            raise self._blocked
        if self._engine is not None and getattr(self._engine, "dead", False):
            self.close()
        if self._engine is None:
            started = time.perf_counter()
            try:
                self._engine = self.factory(self.cell, self.model_path)
                self._identity = (self._engine.name, self._engine.version)
            except EngineFailure as exc:
                self._start_failure = exc
                raise
            finally:
                self.start_seconds += time.perf_counter() - started
        return self._engine

    def identity(self) -> tuple[str, str | None]:
        """The engine's name and version (known findings are keyed by them), also when none runs now: those
        of the last engine this handle started, else the factory's ``name`` and ``engine_version()`` (the
        cell's engine name and None when the factory has neither)."""
        if self._engine is not None:
            return self._engine.name, self._engine.version
        if self._identity is not None:
            return self._identity
        name = getattr(self.factory, "name", None)
        version_of = getattr(self.factory, "engine_version", None)
        return (
            name if isinstance(name, str) else self.cell.engine,
            version_of() if callable(version_of) else None,
        )

    def close(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()
