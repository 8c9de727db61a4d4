"""Hypothesis strategies for sampling parameters and test cases, and the kit's settings profiles.

Every parameter of the contract is drawn, each with its default as the simplest value so that shrinking
ends at the fewest non-default parameters that still fail. Profiles (``--parity-profile``):

* ``dev``: 15 examples per test, for a quick local look;
* ``ci``: 100 examples per test (the CPU CI tier);
* ``nightly``: 500 examples per test.

All profiles have no deadline (engine calls take variable time) and print the reproduction blob.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from conformance.spec import SamplingSpec


@dataclass(frozen=True)
class Vocabulary:
    """What the strategies need to know about the model's tokens."""

    size: int
    eos_token_id: int | None
    words: tuple[str, ...]
    """Decoded single tokens usable as bad words (non-blank)."""


@dataclass(frozen=True)
class Case:
    """One example: which prompts (indices into the prompt set) and one spec shared by all of them."""

    prompts: tuple[int, ...]
    spec: SamplingSpec


def _maybe(default: object, strategy: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(st.just(default), strategy)


def temperatures() -> st.SearchStrategy[float]:
    """Greedy (0), the clamp zone (0, 0.01), typical RL temperatures and a continuous range."""
    return st.one_of(
        st.just(1.0),
        st.just(0.0),
        st.sampled_from([0.6, 0.7, 0.8, 1.2]),
        st.floats(0.001, 0.0099),
        st.floats(0.2, 1.5),
    )


@st.composite
def sampling_specs(
    draw: st.DrawFn,
    vocab: Vocabulary,
    max_tokens: int = 24,
    temperature: st.SearchStrategy[float] | None = None,
) -> SamplingSpec:
    """Any valid :class:`SamplingSpec` over ``vocab``; masks always leave at least 8 tokens."""
    token = st.integers(0, vocab.size - 1)
    allowed = draw(_maybe(None, st.frozensets(token, min_size=16, max_size=200).map(lambda s: tuple(sorted(s)))))
    bad_words: tuple[str, ...] = ()
    if vocab.words:
        bad_words = tuple(draw(st.lists(st.sampled_from(vocab.words), max_size=3, unique=True)))
    bias = draw(st.lists(st.tuples(token, st.floats(-10, 10, allow_nan=False)), max_size=5, unique_by=lambda tb: tb[0]))
    generated = draw(st.integers(1, max_tokens))
    temp = draw(temperature if temperature is not None else temperatures())
    return SamplingSpec(
        temperature=temp,
        top_p=draw(_maybe(1.0, st.floats(0.05, 0.99))),
        top_k=draw(_maybe(0, st.integers(1, 50))),
        min_p=draw(_maybe(0.0, st.floats(0.001, 0.5))),
        repetition_penalty=draw(_maybe(1.0, st.floats(0.5, 2.0))),
        frequency_penalty=draw(_maybe(0.0, st.floats(-1.0, 1.0))),
        presence_penalty=draw(_maybe(0.0, st.floats(-1.0, 1.0))),
        logit_bias=tuple((int(t), float(b)) for t, b in bias),
        allowed_token_ids=allowed,
        bad_words=bad_words,
        min_tokens=draw(_maybe(0, st.integers(1, generated))),
        max_tokens=generated,
        # vLLM rejects n > 1 with greedy sampling (SamplingParams._verify_greedy_sampling).
        n=1 if temp == 0.0 else draw(_maybe(1, st.integers(2, 3))),
        seed=draw(_maybe(None, st.integers(0, 2**31 - 1))),
        logprobs=draw(_maybe(0, st.integers(1, 5))),
    )


@st.composite
def cases(
    draw: st.DrawFn,
    vocab: Vocabulary,
    prompt_count: int,
    max_batch: int = 6,
    specs: st.SearchStrategy[SamplingSpec] | None = None,
) -> Case:
    """A batch of 1..max_batch prompts (repeats allowed: they exercise the prefix cache) and one spec."""
    prompts = draw(st.lists(st.integers(0, prompt_count - 1), min_size=1, max_size=max_batch))
    spec = draw(specs if specs is not None else sampling_specs(vocab))
    return Case(tuple(prompts), spec)


def vocabulary_from_tokenizer(tokenizer: Any, size: int, limit: int = 400) -> Vocabulary:
    """Build a :class:`Vocabulary` from an HF tokenizer: bad-word candidates are decoded single tokens."""
    words: list[str] = []
    decode = tokenizer.decode
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token_id in range(min(size, 4 * limit)):
        if token_id in special:
            continue
        text = decode([token_id])
        if text.strip() and text.isprintable() and text.strip() not in words:
            words.append(text.strip())
        if len(words) >= limit:
            break
    eos = getattr(tokenizer, "eos_token_id", None)
    return Vocabulary(size=size, eos_token_id=eos if isinstance(eos, int) else None, words=tuple(words))
