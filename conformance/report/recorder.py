"""What a parity session collected: every check's report and every engine failure, and the results file.

Light on purpose (no torch): the pytest plugin creates the :class:`Recorder` in ``pytest_configure`` of
every session of a repo that installs the kit.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conformance.parity import ParityReport


@dataclass
class EngineFailureRecord:
    """An engine failure with what reproduces it; ``known`` is the id of a known finding it matches."""

    cell: str
    params: str
    reason: str
    log_tail: str
    known: str | None = None


@dataclass
class Recorder:
    """Collects reports and engine failures for the summary table and ``--parity-results``."""

    results_path: Path | None = None
    reports: list[tuple[str, str, ParityReport]] = field(default_factory=list)
    engine_failures: list[EngineFailureRecord] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    """Every check as the JSON record the results file holds (the per-cell table reads these)."""
    failure_records: list[dict[str, Any]] = field(default_factory=list)
    """Every engine failure as its JSON record."""
    timing_records: list[dict[str, Any]] = field(default_factory=list)
    """Per test: where its wall time went."""

    def add(self, test: str, report: ParityReport, extra: dict[str, Any] | None = None) -> None:
        """Keep ``report`` for the summary and write its record (plus ``extra`` keys) to the results file."""
        self.reports.append((test, report.cell, report))
        record = {"kind": "check", "test": test, **report.as_record(), **(extra or {})}
        self.records.append(record)
        self._write(record)

    def add_failure(self, test: str, failure: EngineFailureRecord) -> None:
        self.engine_failures.append(failure)
        record = {"kind": "engine-failure", "test": test, **failure.__dict__}
        self.failure_records.append(record)
        self._write(record)

    def add_timing(self, test: str, cell: str, seconds: dict[str, float]) -> None:
        """Where one test's wall time went (``wall`` and the ``engine_start`` / ``generate`` / ``reference``
        / ``contract`` shares), for ``benchmarks/suite_profile.py``."""
        record = {"kind": "timing", "test": test, "cell": cell, "seconds": {k: round(v, 4) for k, v in seconds.items()}}
        self.timing_records.append(record)
        self._write(record)

    def payload(self) -> str:
        """Everything recorded, as JSON (what a pytest-xdist worker hands to the controller)."""
        return json.dumps(
            {
                "records": self.records,
                "failures": self.failure_records,
                "timings": self.timing_records,
                "versions": self.versions,
            },
            default=str,
        )

    def merge(self, payload: str, write: bool = True) -> None:
        """Take over a worker's :meth:`payload`: its records join this recorder's (and, with ``write``, the
        results file)."""
        data = json.loads(payload)
        if data.get("versions") and not self.versions:
            self.versions.update(data["versions"])
        for record in data.get("records", []):
            self.records.append(record)
        for record in data.get("failures", []):
            self.failure_records.append(record)
            fields = {k: record.get(k) for k in ("cell", "params", "reason", "log_tail", "known")}
            self.engine_failures.append(EngineFailureRecord(**fields))
        for record in data.get("timings", []):
            self.timing_records.append(record)
        if write:
            for record in data.get("records", []) + data.get("failures", []) + data.get("timings", []):
                self._write(record)

    def _write(self, record: dict[str, Any]) -> None:
        if self.results_path is None:
            return
        record = {**record, "versions": self.versions, "pid": os.getpid()}
        self.results_path.parent.mkdir(parents=True, exist_ok=True)
        with self.results_path.open("a") as fh:
            fh.write(json.dumps(record, default=str) + "\n")
