"""The reference protocol, and a user's trainer logprob function as a reference.

The kit judges an engine against a *reference*: anything with ``vocab_size`` and
``raw_logits(sequences)``. The built-in one is :class:`~conformance.reference.HFReference` (an fp32
HuggingFace forward). In another repository the real contract is *engine vs. their trainer*:
``--parity-trainer-fn module:function`` plugs the trainer's own computation in its place, wrapped by
:class:`TrainerFnReference`. The contract (:mod:`conformance.contract`) and the metrics stay the kit's.

The trainer function's protocol (:data:`TrainerLogitsFn`)::

    def trainer_logits(sequences, model_path=None) -> list[torch.Tensor]:
        # sequences: list of (prompt_ids, completion_ids), both lists of ints
        # return, per sequence, float32 logits [len(completion_ids), vocab_size]: row i is what the
        # trainer's model computes at the position that predicts completion_ids[i] (i.e. the logits
        # its ``logprobs_from_logits(logits, labels)`` would receive, before any temperature)

``model_path`` (optional parameter) receives the cell's model directory. Return *logits*, not
log-probabilities: the contract applies temperature, penalties and truncation itself, and the
repetition penalty (``z / r`` for positive ``z``, ``z * r`` otherwise) and the ``*_logits`` modes are
not invariant under the per-row shift a log-softmax adds. Every test of the suite needs only this: tests
that compare prompt positions (precision, rescore) ask for them as completions of a one-token prompt.
A wrong return (not a list of the right length, a wrong shape, non-finite values) raises
:class:`TrainerFnError` with one line naming the function.
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast, runtime_checkable

if TYPE_CHECKING:
    import torch

Sequences = Sequence[tuple[Sequence[int], Sequence[int]]]
TrainerLogitsFn = Callable[..., Sequence[Any]]
"""``fn(sequences, [model_path=...]) -> list of [len(completion), vocab] fp32 logits`` (see module doc)."""


@runtime_checkable
class Reference(Protocol):
    """What the kit asks of a reference (the fp32 HF model, or the user's trainer)."""

    @property
    def vocab_size(self) -> int:
        """Size of the logits' last dimension (the model's vocabulary)."""
        ...

    def raw_logits(self, sequences: Sequences) -> list[torch.Tensor]:
        """Per ``(prompt_ids, output_ids)`` pair, fp32 logits ``[len(output_ids), vocab_size]`` on CPU;
        row ``i`` predicted ``output_ids[i]``."""
        ...


class SpecError(ValueError):
    """A ``module:attribute`` spec does not resolve; the message is one line naming the option."""


class TrainerFnError(ValueError):
    """The user's trainer function returned something the protocol does not allow (one line)."""


def load_object(spec: str, option: str) -> Callable[..., Any]:
    """Import ``module:attribute`` (dots allowed in both) and return it; it must be callable."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise SpecError(f"{option} {spec!r}: expected 'module:function' (e.g. my_trainer:trainer_logits)")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import problem is the user's, in one line
        text = " ".join(str(exc).split())[:200]
        raise SpecError(
            f"{option} {spec!r}: cannot import module {module_name!r}: {type(exc).__name__}: {text}"
        ) from None
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise SpecError(f"{option} {spec!r}: module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise SpecError(f"{option} {spec!r}: {attribute!r} is a {type(target).__name__}, not callable")
    return cast("Callable[..., Any]", target)


def _model_vocab(model_path: Path | None) -> int | None:
    if model_path is None:
        return None
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    size = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))
    return int(size) if isinstance(size, int) else None


def _accepts_model_path(fn: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "model_path" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


class TrainerFnReference:
    """A :class:`Reference` computed by the user's trainer function ``fn`` (see the module doc).

    ``vocab_size`` is the model's ``config.json`` vocab size when ``model_path`` is given, else the width
    of the first result. ``name`` is how errors refer to the function (its ``--parity-trainer-fn`` spec).
    """

    def __init__(self, fn: TrainerLogitsFn, model_path: Path | None = None, name: str | None = None) -> None:
        self.fn = fn
        self.model_path = model_path
        self.name = name or getattr(fn, "__qualname__", repr(fn))
        self._pass_path = model_path is not None and _accepts_model_path(fn)
        self._vocab = _model_vocab(model_path)

    @property
    def vocab_size(self) -> int:
        if self._vocab is None:
            self.raw_logits([((0,), (0,))])
        assert self._vocab is not None
        return self._vocab

    def raw_logits(self, sequences: Sequences) -> list[torch.Tensor]:
        import torch

        pairs = [(list(map(int, p)), list(map(int, o))) for p, o in sequences]
        try:
            out = self.fn(pairs, model_path=self.model_path) if self._pass_path else self.fn(pairs)
        except Exception as exc:  # noqa: BLE001 - the user's code: one line, not their traceback
            text = " ".join(str(exc).split())[:200]
            raise TrainerFnError(f"trainer function {self.name} raised {type(exc).__name__}: {text}") from None
        if not isinstance(out, (list, tuple)) or len(out) != len(pairs):
            got = f"{type(out).__name__} of length {len(out)}" if hasattr(out, "__len__") else type(out).__name__
            raise TrainerFnError(
                f"trainer function {self.name} must return a list of {len(pairs)} tensors (one per sequence), got {got}"
            )
        results = []
        for index, ((_, completion), value) in enumerate(zip(pairs, out)):
            try:
                tensor = torch.as_tensor(value).detach().to("cpu", torch.float32)
            except Exception as exc:  # noqa: BLE001
                raise TrainerFnError(
                    f"trainer function {self.name}: result {index} is not a tensor ({type(value).__name__}: {exc})"
                ) from None
            if self._vocab is None and tensor.ndim == 2:
                self._vocab = int(tensor.shape[1])
            expected = (len(completion), self._vocab)
            if tuple(tensor.shape) != expected:
                raise TrainerFnError(
                    f"trainer function {self.name}: result {index} has shape {tuple(tensor.shape)}, expected "
                    f"{expected} ([len(completion), vocab] logits at the completion positions)"
                )
            if not bool(torch.isfinite(tensor).all()):
                raise TrainerFnError(
                    f"trainer function {self.name}: result {index} has non-finite values (logits are expected, "
                    "not masked or processed log-probabilities)"
                )
            results.append(tensor)
        return results

    def probe(self) -> None:
        """Call the function once on two short sequences of different lengths (fails fast, one line)."""
        self.raw_logits([((1, 2, 3), (4, 5)), ((1, 2), (3, 4, 5, 6))])
