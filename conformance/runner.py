"""Drive one engine and the reference through a case and judge it: the suite's (and users') workhorse.

* :class:`PromptSet`: the prompt texts and their token ids under the model's tokenizer.
* :class:`EngineHandle`: the cell's engine, started lazily and restarted after an engine death, with the
  engine failures it met.
* :class:`ParityRunner`: ``run(case)`` sends a case to the engine, scores the same tokens with the fp32
  reference and returns the :class:`~conformance.parity.ParityReport` (recorded in a :class:`Recorder`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conformance.spec import TrainerSemantics
from conformance.engines.base import Engine, EngineFailure, Request, Sample
from conformance.matrix import Cell
from conformance.parity import ParityReport, SequenceInput, Target, check_parity
from conformance.recorder import EngineFailureRecord, Recorder
from conformance.reference import HFReference
from conformance.strategies import Case

EngineFactory = Callable[[Cell, Path], Engine]


def default_engine_factory(cell: Cell, model_path: Path) -> Engine:
    """The built-in adapter for ``cell.engine``: ``vllm`` the offline ``vllm.LLM``, ``vllm-server`` a
    ``vllm serve`` subprocess (:mod:`conformance.engines.vllm_server`)."""
    if cell.engine == "vllm-server":
        from conformance.engines.vllm_server import VllmServerEngine

        return VllmServerEngine(cell, model_path)
    from conformance.engines.vllm_offline import VllmOfflineEngine

    return VllmOfflineEngine(cell, model_path)


@dataclass(frozen=True)
class PromptSet:
    """Prompt texts and their token ids (BOS first when the tokenizer has one)."""

    texts: tuple[str, ...]
    ids: tuple[tuple[int, ...], ...]

    @classmethod
    def load(cls, path: Path, tokenizer: Any) -> "PromptSet":
        if not path.is_file():
            raise ValueError(f"prompt file not found: {path}")
        try:
            texts = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from None
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
            raise ValueError(f"{path}: expected a non-empty JSON list of non-empty strings")
        bos = getattr(tokenizer, "bos_token_id", None)
        ids = []
        for text in texts:
            tokens = list(tokenizer.encode(text, add_special_tokens=False))
            ids.append(tuple(([bos] if isinstance(bos, int) else []) + tokens))
        return cls(tuple(texts), tuple(ids))


def describe_case(case: Case) -> str:
    """What reproduces a case: its prompt indices (``[12]*206`` for one prompt repeated) and spec."""
    prompts = case.prompts
    listed = f"[{prompts[0]}]*{len(prompts)}" if len(prompts) > 8 and len(set(prompts)) == 1 else str(list(prompts))
    return f"prompts={listed} {case.spec.describe()}"


class EngineHandle:
    """The engine of one cell: started on first use, restarted after it died, closed once."""

    def __init__(self, cell: Cell, model_path: Path, factory: EngineFactory = default_engine_factory) -> None:
        self.cell = cell
        self.model_path = model_path
        self.factory = factory
        self.failures: list[EngineFailureRecord] = []
        self._engine: Engine | None = None
        self._start_failure: EngineFailure | None = None

    @property
    def engine(self) -> Engine:
        """The running engine; a start failure is remembered and re-raised, never retried."""
        if self._start_failure is not None:
            raise self._start_failure
        if self._engine is not None and getattr(self._engine, "dead", False):
            self.close()
        if self._engine is None:
            try:
                self._engine = self.factory(self.cell, self.model_path)
            except EngineFailure as exc:
                self._start_failure = exc
                raise
        return self._engine

    def close(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()


class ParityRunner:
    """Runs cases for one cell against the fp32 reference and judges them."""

    def __init__(
        self,
        handle: EngineHandle,
        reference: HFReference,
        prompts: PromptSet,
        trainer: TrainerSemantics | None = None,
        recorder: Recorder | None = None,
        decode: Callable[[int], str] | None = None,
    ) -> None:
        self.handle = handle
        self.reference = reference
        self.prompts = prompts
        self.trainer = trainer
        self.recorder = recorder
        self.decode = decode

    @property
    def cell(self) -> Cell:
        return self.handle.cell

    @property
    def target(self) -> Target:
        return self.trainer if self.trainer is not None else self.cell.logprobs_mode

    def requests(self, case: Case) -> list[Request]:
        return [Request(self.prompts.ids[i], case.spec) for i in case.prompts]

    def generate(self, requests: Sequence[Request]) -> list[list[Sample]]:
        """Engine samples for ``requests`` (raises :class:`EngineFailure`)."""
        return self.handle.engine.generate(requests)

    def judge(self, requests: Sequence[Request], samples: Sequence[Sequence[Sample]], test: str = "") -> ParityReport:
        """Score the engine's samples with the reference and the contract."""
        engine = self.handle.engine
        flat: list[tuple[Request, Sample]] = [(r, s) for r, group in zip(requests, samples) for s in group]
        logits = self.reference.raw_logits([(s.prompt_ids, s.output_ids) for _, s in flat])
        contexts = {id(r): engine.token_context(r) for r in requests}
        inputs = [SequenceInput(s, lg, contexts[id(r)]) for (r, s), lg in zip(flat, logits)]
        spec = requests[0].spec
        report = check_parity(
            inputs,
            spec,
            self.target,
            self.cell.tolerance,
            self.cell.id,
            engine_description=engine.description,
            trainer_declared=self.trainer is not None,
            decode=self.decode,
        )
        if self.recorder is not None:
            self.recorder.add(test, report)
        return report

    def run(self, case: Case, test: str = "") -> ParityReport:
        """Generate the case on the engine, then judge it."""
        requests = self.requests(case)
        return self.judge(requests, self.generate(requests), test)

    def engine_failure(
        self, params: str, failure: EngineFailure, test: str = "", known: str | None = None
    ) -> EngineFailureRecord:
        """Record an engine failure; ``params`` says what reproduces it (see :func:`describe_case`)."""
        record = EngineFailureRecord(self.cell.id, params, failure.reason, failure.log_tail, known)
        self.handle.failures.append(record)
        if self.recorder is not None:
            self.recorder.add_failure(test, record)
        return record
