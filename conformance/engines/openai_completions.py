"""The OpenAI ``/v1/completions`` mapping: a :class:`Request` as a JSON body, a choice as a :class:`Sample`.

Engine-independent (vLLM's server, or any server that implements vLLM's extra sampling fields): the body
carries every :class:`~conformance.spec.SamplingSpec` field under its own name (derived from the spec,
so a new sampling parameter needs no change here), a token-id prompt, ``logprobs``, ``prompt_logprobs``,
``return_tokens_as_token_ids`` and ``return_token_ids``; values come back with ``-9999.0`` for -inf.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from conformance.engines.base import Request, Sample

SERVER_INF = -9999.0
"""The server's JSON stand-in for -inf (``max(logprob, -9999.0)`` in vLLM's OpenAI layer)."""


def completion_body(request: Request) -> dict[str, Any]:
    """The ``/v1/completions`` JSON body for ``request``: the token-id prompt and every sampling field
    (unset optional ones left out, so the server's own validation sees only what was asked)."""
    fields = request.spec.to_kwargs(every_field=True)
    body: dict[str, Any] = {"prompt": list(request.prompt_ids)}
    body.update({k: v for k, v in fields.items() if v is not None and v != [] and v != {}})
    if "logit_bias" in body:
        body["logit_bias"] = {str(t): b for t, b in body["logit_bias"].items()}
    body.update(return_tokens_as_token_ids=True, return_token_ids=True, skip_special_tokens=False)
    if request.prompt_logprobs is not None:
        body["prompt_logprobs"] = request.prompt_logprobs
    return body


def unclamp(value: Any) -> float:
    """The server's number as a logprob: ``-9999.0`` (its -inf) back to ``-inf``."""
    number = float(value)
    return -math.inf if number <= SERVER_INF else number


def token_id(text: str) -> int:
    """``"token_id:123"`` (``return_tokens_as_token_ids``) -> 123."""
    if not isinstance(text, str) or not text.startswith("token_id:"):
        raise ValueError(f"expected 'token_id:<int>', got {text!r}")
    return int(text.split(":", 1)[1])


def parse_choice(request: Request, choice: Mapping[str, Any], cached_tokens: int | None = None) -> Sample:
    """One ``/v1/completions`` choice as a :class:`Sample` (raises ValueError/KeyError/TypeError when the
    choice does not have the documented shape)."""
    logprobs = choice["logprobs"]
    if logprobs is None:
        raise ValueError("choice has no logprobs")
    tokens = [token_id(t) for t in logprobs["tokens"]]
    token_ids = choice.get("token_ids")
    if token_ids is not None and list(map(int, token_ids)) != tokens:
        raise ValueError(f"token_ids {token_ids} disagree with the logprob tokens {tokens}")
    tops: list[dict[int, float]] = []
    sampled: list[float | None] = []
    for i, token in enumerate(tokens):
        entry = logprobs["top_logprobs"][i] or {}
        values = {token_id(t): unclamp(v) for t, v in entry.items()}
        value = logprobs["token_logprobs"][i]
        if value is not None:
            values.setdefault(token, unclamp(value))
        tops.append(values)
        sampled.append(values.get(token))
    sample = Sample(tuple(request.prompt_ids), tokens, sampled, tops, choice.get("finish_reason"))
    sample.cached_tokens = cached_tokens
    if request.prompt_logprobs is not None:
        sample.prompt_values = [
            None if entry is None else {int(t): unclamp(lp["logprob"]) for t, lp in entry.items()}
            for entry in (choice.get("prompt_logprobs") or [])
        ]
    return sample


def parse_response(request: Request, response: Any) -> list[Sample]:
    """Every choice of a ``/v1/completions`` response (index order), with the cached prompt tokens the
    usage reports (``--enable-prompt-tokens-details``)."""
    details = (response.get("usage") or {}).get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens")
    choices = sorted(response["choices"], key=lambda c: int(c["index"]))
    return [parse_choice(request, c, cached) for c in choices]
