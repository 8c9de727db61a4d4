"""Reading ``--parity-results`` files: one JSON record per check (or engine failure) per line.

:func:`load_run` parses one file into a :class:`Run`; bad input is a one-line :class:`ResultsError`
naming the file and line. The report (:mod:`conformance.report.markdown`) and plots (:mod:`conformance.report.plots`)
read only these structures.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ResultsError(ValueError):
    """A results file is missing or malformed; the message is one line naming the file (and line)."""


@dataclass
class Run:
    """The records of one results file."""

    path: Path
    checks: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    timings: list[dict[str, Any]] = field(default_factory=list)

    @property
    def versions(self) -> dict[str, str]:
        for record in self.checks + self.failures:
            if record.get("versions"):
                return dict(record["versions"])
        return {}

    @property
    def label(self) -> str:
        """Short name for plots: the vLLM version (and the file stem when it adds something)."""
        vllm = self.versions.get("vllm")
        return f"vllm {vllm}\n({self.path.stem})" if vllm else self.path.stem

    def cells(self) -> list[str]:
        return sorted({str(r.get("cell")) for r in self.checks + self.failures})


def load_run(path: Path) -> Run:
    """Parse a results file; blank lines are skipped, anything else must be a JSON object with ``kind``."""
    if not path.is_file():
        raise ResultsError(f"results file not found: {path}")
    run = Run(path)
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ResultsError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or record.get("kind") not in ("check", "engine-failure", "timing"):
            raise ResultsError(
                f"{path}:{number}: not a parity record (expected kind 'check', 'engine-failure' or 'timing')"
            )
        {"check": run.checks, "engine-failure": run.failures, "timing": run.timings}[record["kind"]].append(record)
    if not run.checks and not run.failures:
        raise ResultsError(f"{path}: no records (was the run made with --parity-results?)")
    return run


def finite(values: list[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
