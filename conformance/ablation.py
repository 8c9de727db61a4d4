"""Ablation of a failing check: which of its sampling parameters the failure needs.

Pure logic, no engine and no torch: :func:`ablate` takes the failing :class:`~conformance.spec.SamplingSpec`
and a callable that re-runs the *same* check (same prompts, same seeds, same engine) under another spec and
says how it ended. It then

1. resets each non-default sampling parameter to its default, one at a time (the one-at-a-time table);
2. searches the smallest set of parameters that still fails with every other one reset, by delta debugging
   (Zeller's ddmin over the non-default parameters, started from the parameters whose removal alone made
   the check pass, with every outcome cached): the result is 1-minimal, i.e. removing any one of its
   parameters makes the check pass;
3. stops at ``max_calls`` re-runs, saying the set found so far may not be minimal.

Only the parameters of the sampler's semantics are ablated (:data:`ABLATED_FIELDS`: temperature, the
shaping parameters of contract steps 1-5 and the truncation parameters of steps 8-10). ``seed``, ``n``,
``max_tokens``, ``logprobs``, ``stop_token_ids`` and ``ignore_eos`` say what is generated and reported, not
what a logprob means, and stay fixed; a greedy spec keeps T = 0 (resetting it would sample) and its
truncation parameters are not ablated (vLLM ignores them for greedy requests).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from conformance.spec import SHAPING_FIELDS, TRUNCATION_FIELDS, SamplingSpec

Outcome = Literal["passed", "failed", "error"]
"""How one re-run ended: the check passed, failed, or the engine failed (neither)."""

ABLATED_FIELDS: tuple[str, ...] = ("temperature", *TRUNCATION_FIELDS, *SHAPING_FIELDS)
"""The parameters an ablation resets: the sampler's semantics, in the order tables list them."""

DEFAULT_MAX_CALLS = 24
"""Re-runs of the check one ablation may spend (``--parity-diagnose-calls``)."""


def ablated_fields(spec: SamplingSpec) -> list[str]:
    """The non-default parameters of ``spec`` an ablation resets (see the module docstring)."""
    names = spec.non_default(ABLATED_FIELDS)
    if spec.greedy:
        names = [n for n in names if n != "temperature" and n not in TRUNCATION_FIELDS]
    return names


class _OutOfCalls(Exception):
    pass


@dataclass
class Ablation:
    """What resetting the failing spec's parameters did."""

    spec: SamplingSpec
    """The failing spec."""
    fields: tuple[str, ...]
    """Its ablated (non-default, semantic) parameters."""
    one_at_a_time: dict[str, Outcome] = field(default_factory=dict)
    """Parameter -> how the check ended with that one parameter reset."""
    minimal: tuple[str, ...] = ()
    """The smallest set of parameters found that still fails with all others reset (``()``: the check
    fails with every sampling parameter at its default)."""
    proven: bool = True
    """Whether ``minimal`` is 1-minimal (False: the call budget ran out first, or an engine error hid an
    outcome)."""
    calls: int = 0
    """Re-runs of the check spent."""
    trials: list[tuple[tuple[str, ...], Outcome]] = field(default_factory=list)
    """Every kept-parameter set tried, in order, with its outcome."""

    @property
    def consistent(self) -> bool:
        """Whether every re-run that kept the whole minimal set failed (a noise-level failure that comes
        and goes at random rarely is)."""
        return all(outcome == "failed" for kept, outcome in self.trials if set(self.minimal) <= set(kept))

    def summary(self) -> str:
        """One sentence, e.g. "fails only while min_p=0.5 and top_p=0.5 are both set; passes with either
        removed (4 engine re-runs)"."""

        def named(names: Sequence[str]) -> list[str]:
            return [f"{n}={_short(getattr(self.spec, n))}" for n in names]

        if not self.fields:
            text = "every sampling parameter is already at its default: the failure needs none of them"
        elif not self.minimal:
            text = "fails with every sampling parameter at its default: not caused by the sampling parameters"
        else:
            kept = named(self.minimal)
            if len(kept) == 1:
                text = f"fails while {kept[0]} is set; passes with it removed"
            elif len(kept) == 2:
                text = f"fails only while {kept[0]} and {kept[1]} are both set; passes with either removed"
            else:
                text = (
                    f"fails only while {', '.join(kept[:-1])} and {kept[-1]} are all set; passes with any one removed"
                )
            irrelevant = [n for n in self.fields if n not in self.minimal and self.one_at_a_time.get(n) == "failed"]
            if irrelevant:
                text += f"; still fails with {', '.join(irrelevant)} removed"
            also = [n for n in self.fields if n not in self.minimal and self.one_at_a_time.get(n) == "passed"]
            if also:
                text += f"; passes with {', '.join(also)} removed too (it takes part when the others are set)"
        errors = [n for n, o in self.one_at_a_time.items() if o == "error"]
        if errors:
            text += f"; the engine failed with {', '.join(errors)} removed"
        if not self.proven:
            text += f" (search stopped after {self.calls} re-runs: the set may not be minimal)"
        else:
            text += f" ({self.calls} engine re-run{'s' if self.calls != 1 else ''})"
        return text

    def table(self) -> list[str]:
        """The one-at-a-time table, one line per parameter."""
        return [
            f"{name}={_short(getattr(self.spec, name))} reset: {outcome}"
            for name, outcome in self.one_at_a_time.items()
        ]

    def as_record(self) -> dict[str, object]:
        return {
            "fields": list(self.fields),
            "minimal": list(self.minimal),
            "proven": self.proven,
            "one_at_a_time": dict(self.one_at_a_time),
            "calls": self.calls,
            "summary": self.summary(),
        }


def _short(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple) and len(value) > 4:
        return f"({len(value)} entries)"
    return repr(value)


def ablate(
    spec: SamplingSpec,
    outcome: Callable[[SamplingSpec], Outcome],
    *,
    max_calls: int = DEFAULT_MAX_CALLS,
    fields: Sequence[str] | None = None,
) -> Ablation:
    """Which parameters of the failing ``spec`` the failure needs (see the module docstring).

    ``outcome(other_spec)`` re-runs the check under ``other_spec`` (``spec`` with some parameters reset)
    and returns ``"passed"``, ``"failed"`` or ``"error"``; it is called at most ``max_calls`` times and
    never for ``spec`` itself, which is known to fail. ``fields`` overrides :func:`ablated_fields`.
    """
    names = tuple(fields if fields is not None else ablated_fields(spec))
    result = Ablation(spec, names)
    if not names:
        return result
    cache: dict[frozenset[str], Outcome] = {frozenset(names): "failed"}

    def run(kept: frozenset[str]) -> Outcome:
        if kept not in cache:
            if result.calls >= max_calls:
                raise _OutOfCalls
            result.calls += 1
            cache[kept] = outcome(spec.reset(*(n for n in names if n not in kept)))
            result.trials.append((tuple(n for n in names if n in kept), cache[kept]))
        return cache[kept]

    def fails(kept: Sequence[str]) -> bool:
        return run(frozenset(kept)) == "failed"

    best: list[str] = list(names)
    try:
        for name in names:
            result.one_at_a_time[name] = run(frozenset(names) - {name})
        needed = [n for n in names if result.one_at_a_time[n] == "passed"]
        start = needed if needed and fails(needed) else list(names)
        best = _ddmin(start, fails, lambda found: best.__setitem__(slice(None), found))
        if len(best) == 1 and fails([]):
            best = []
    except _OutOfCalls:
        result.proven = False
    result.minimal = tuple(n for n in names if n in best)
    if any(o == "error" for o in cache.values()):
        result.proven = False
    return result


def _ddmin(
    items: list[str], fails: Callable[[Sequence[str]], bool], progress: Callable[[list[str]], None]
) -> list[str]:
    """Zeller's ddmin: a 1-minimal failing subset of ``items`` (which fails); ``progress`` sees every
    smaller failing set as it is found (so a budget stop keeps the best so far)."""
    progress(list(items))
    n = 2
    while len(items) >= 2:
        size = len(items)
        chunks = [items[i * size // n : (i + 1) * size // n] for i in range(n)]
        reduced = False
        for chunk in chunks:
            if fails(chunk):
                items, n, reduced = chunk, 2, True
                break
        if not reduced:
            for chunk in chunks:
                complement = [x for x in items if x not in chunk]
                if fails(complement):
                    items, n, reduced = complement, max(n - 1, 2), True
                    break
        if reduced:
            progress(list(items))
            continue
        if n >= len(items):
            break
        n = min(len(items), 2 * n)
    return items
