"""Upstream reproduction scripts: a failing check written as one self-contained Python file.

:func:`write_repro` writes a script that imports only vllm, transformers, torch and the standard library (no
kit import, so it can be attached to an upstream issue as is). It holds the model path, the prompt token
ids, the ``SamplingParams`` keyword arguments of every request, the cell's engine keyword arguments and
environment, and the contract's lines for the steps these parameters use (taken from
:data:`STEP_SNIPPETS`). Run, it starts ``vllm.LLM`` offline, generates, runs an fp32 HuggingFace forward
over the same tokens, applies those steps, prints engine vs expected for the worst sampled tokens and the
largest difference against the failing cell's bound, and exits 0.

The snippets are a second, plain reading of :mod:`conformance.contract`; tests/test_repro.py proves them
equal to the contract over hypothesis-drawn parameters and executes a written script against a real engine.
"""

from __future__ import annotations

import hashlib
import pprint
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from conformance.spec import LogprobsMode, SamplingSpec, TokenContext

KIT_ONLY_ENGINE_KWARGS = ("weight_transfer_config",)
"""Engine arguments that name the kit's own plugins (the CPU tier's ``parity-host`` weight-transfer
backend): left out of a reproduction, which must run without the kit. None of them touches sampling."""

# Each snippet is the contract step as plain torch, at the indentation of its place in ``expected``.
# Per-position steps (1-5) run inside ``for i in range(positions)`` with ``row = z[i]`` and ``history``
# (the output tokens before position i); ``s`` is the request's SamplingParams kwargs, ``r`` the request.
STEP_SNIPPETS: dict[str, str] = {
    "allowed_token_ids": """\
    # step 1: allowed_token_ids -> every other token -inf
    allowed = torch.zeros(vocab, dtype=torch.bool)
    allowed[list(s["allowed_token_ids"])] = True
    z[:, ~allowed] = NEG_INF
""",
    "bad_words": """\
        # step 2: bad words -> the word's last token -inf when the *output* so far ends with its other tokens
        for word in r["bad_words_token_ids"]:
            prefix = word[:-1]
            if len(word) <= len(history) + 1 and (not prefix or history[len(history) - len(prefix):] == prefix):
                row[word[-1]] = NEG_INF
""",
    "min_tokens": """\
        # step 3: min_tokens -> stop tokens (EOS even with ignore_eos, plus stop_token_ids) -inf
        if i < s["min_tokens"] and r["stop_token_ids"]:
            row[sorted(r["stop_token_ids"])] = NEG_INF
""",
    "logit_bias": """\
        # step 4: logit_bias
        for token, bias in s["logit_bias"].items():
            row[int(token)] += bias
""",
    "repetition_penalty": """\
        # step 5a: repetition penalty over prompt + output tokens (z / r where z > 0, else z * r)
        rp = s["repetition_penalty"]
        seen = prompt_mask | (counts > 0)
        scale = torch.where(row > 0, torch.full_like(row, 1.0 / rp), torch.full_like(row, rp))
        row.mul_(torch.where(seen, scale, torch.ones_like(row)))
""",
    "frequency_penalty": """\
        # step 5b: frequency penalty over output tokens
        row.sub_(s["frequency_penalty"] * counts)
""",
    "presence_penalty": """\
        # step 5c: presence penalty over output tokens
        row.sub_(s["presence_penalty"] * (counts > 0).to(torch.float32))
""",
    "min_p": """\
    # step 8: min_p -> tokens with p < min_p * max p removed
    probs = torch.softmax(scaled, dim=-1)
    keep &= ~(probs < probs.amax(dim=-1, keepdim=True) * s["min_p"])
""",
    "top_k": """\
    # step 9: top_k over the survivors (ties at the k-th value kept)
    current = scaled.masked_fill(~keep, NEG_INF)
    if s["top_k"] < vocab:
        keep &= current >= torch.topk(current, s["top_k"], dim=-1).values[:, -1:]
""",
    "top_p": """\
    # step 10: top_p over the survivors: sorted ascending, drop where the cumulative mass <= 1 - top_p
    current = scaled.masked_fill(~keep, NEG_INF)
    ascending, order = torch.sort(current, dim=-1)
    drop = torch.cumsum(torch.softmax(ascending, dim=-1), dim=-1) <= 1 - s["top_p"]
    drop[:, -1] = False
    keep &= torch.zeros_like(drop).scatter(-1, order, ~drop)
""",
}

_TEMPLATE = '''#!/usr/bin/env python3
"""Upstream reproduction of a logprob-parity failure: {title}

{what}
vLLM (offline, ``vllm.LLM``) with the failing cell's engine arguments generates for the prompt token ids
and sampling parameters below; an fp32 HuggingFace forward over the same tokens, read through the vLLM V1
sampler steps in ``expected`` (the steps these parameters use), gives what each returned value should
be. Prints engine vs expected for the worst sampled tokens and the largest |difference| against the
failing cell's bound; exits 0. Needs only vllm, transformers and torch.

    python {filename}
"""

import math
import os

ENV = {env}
os.environ.update(ENV)  # before vLLM is imported: it reads some of these at import

import torch  # noqa: E402

MODEL = {model}
ENGINE_KWARGS = {engine_kwargs}
LOGPROBS_MODE = {mode}
BOUND = {bound!r}  # the failing cell's max |difference| for these parameters (fp32 tolerance / min(T, 1))
REQUESTS = {requests}
NEG_INF = float("-inf")


def expected(raw, prompt, output, r):
    """The values an engine in LOGPROBS_MODE returns for every token, per the vLLM V1 sampler, from the
    fp32 raw logits ``raw[i]`` that predicted ``output[i]`` ([positions, vocab])."""
    s = r["sampling"]
    if LOGPROBS_MODE == "raw_logprobs":
        return torch.log_softmax(raw, dim=-1)
    if LOGPROBS_MODE == "raw_logits":
        return raw.clone()
    z = raw.to(torch.float32).clone()
    positions, vocab = z.shape
{before_loop}    prompt_mask = torch.zeros(vocab, dtype=torch.bool)
    prompt_mask[list(prompt)] = True
    counts = torch.zeros(vocab)
    for i in range(positions):
        row = z[i]
        history = list(output[:i])
{per_position}        counts[output[i]] += 1.0
{temperature}    keep = torch.isfinite(scaled)
{truncation}    if LOGPROBS_MODE == "processed_logits":
        return scaled.masked_fill(~keep, NEG_INF)
    # step 11: log_softmax over the survivors (renormalised)
    return torch.log_softmax(scaled.masked_fill(~keep, NEG_INF), dim=-1)


def main():
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams

    llm = LLM(model=MODEL, **ENGINE_KWARGS)
    outputs = llm.generate(
        [{{"prompt_token_ids": r["prompt_token_ids"]}} for r in REQUESTS],
        sampling_params=[SamplingParams(**r["sampling"]) for r in REQUESTS],
        use_tqdm=False,
    )
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    rows = []
    for index, (request, output) in enumerate(zip(REQUESTS, outputs)):
        prompt = list(request["prompt_token_ids"])
        for completion in output.outputs:
            tokens = list(completion.token_ids)
            with torch.no_grad():
                logits = model(torch.tensor([prompt + tokens])).logits[0].float()
            values = expected(logits[len(prompt) - 1 : len(prompt) - 1 + len(tokens)], prompt, tokens, request)
            for position, token in enumerate(tokens):
                engine = completion.logprobs[position][token].logprob
                want = float(values[position, token])
                gap = abs(engine - want) if math.isfinite(engine) and math.isfinite(want) else (0.0 if engine == want else math.inf)
                rows.append((gap, index, position, token, engine, want))
    rows.sort(key=lambda row: -row[0])
    print(f"vllm {{__import__('vllm').__version__}}, {{LOGPROBS_MODE}}, {{len(rows)}} sampled tokens of {{len(REQUESTS)}} requests")
    print("worst sampled tokens (request, position, token: engine vs expected):")
    for gap, index, position, token, engine, want in rows[:10]:
        print(f"  request {{index}} pos {{position}} token {{token}}: engine {{engine:.6g}} vs expected {{want:.6g}}  |diff| {{gap:.3g}}")
    worst = rows[0][0] if rows else 0.0
    verdict = "DIVERGES" if worst > BOUND else "agrees"
    print(f"max |engine - expected| {{worst:.3g}} (bound {{BOUND:.3g}}): {{verdict}}")
    print(f"RESULT max_abs={{worst!r}} bound={{BOUND!r}} diverges={{int(worst > BOUND)}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
'''


def engine_arguments(engine_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The cell's ``vllm.LLM`` keyword arguments a reproduction can use (see :data:`KIT_ONLY_ENGINE_KWARGS`)."""
    return {k: v for k, v in engine_kwargs.items() if k not in KIT_ONLY_ENGINE_KWARGS}


def sampling_kwargs(spec: SamplingSpec) -> dict[str, object]:
    """``SamplingParams`` keyword arguments as the kit's offline engine passes them (``logprobs`` always
    set, so the sampled token's value is returned), with every field a step snippet reads."""
    kwargs = spec.to_kwargs()
    kwargs["logprobs"] = spec.logprobs
    return kwargs


def expected_source(spec: SamplingSpec, mode: LogprobsMode) -> str:
    """The ``expected`` function's body parts for ``spec`` (only the steps its parameters use)."""
    shaping = set(spec.shaping_fields())
    before_loop = STEP_SNIPPETS["allowed_token_ids"] if "allowed_token_ids" in shaping else ""
    per_position = "".join(
        STEP_SNIPPETS[name]
        for name in (
            "bad_words",
            "min_tokens",
            "logit_bias",
            "repetition_penalty",
            "frequency_penalty",
            "presence_penalty",
        )
        if name in shaping
    )
    if spec.greedy:
        temperature = "    # step 6: temperature 0 is greedy: no temperature and no truncation (vLLM resets them)\n    scaled = z\n"
    else:
        temperature = (
            "    # step 7: temperature (0 < T < 0.01 clamped to 0.01 by SamplingParams)\n"
            '    scaled = z / max(s.get("temperature", 1.0), 0.01)\n'
        )
    truncation = "".join(STEP_SNIPPETS[name] for name in spec.truncation_fields()) if spec.truncates else ""
    return before_loop + "\0" + per_position + "\0" + temperature + "\0" + truncation


def _literal(value: Any) -> str:
    """A Python literal (``logit_bias`` keeps its int keys, which JSON would turn into strings)."""
    return pprint.pformat(value, width=110, sort_dicts=False, compact=True)


def render_repro(
    *,
    title: str,
    what: str,
    model_path: Path | str,
    engine_kwargs: Mapping[str, Any],
    env: Mapping[str, str],
    mode: LogprobsMode,
    bound: float,
    requests: Sequence[tuple[Sequence[int], SamplingSpec]],
    contexts: Sequence[TokenContext],
    filename: str = "repro.py",
) -> str:
    """The script's text for ``requests`` (prompt ids and spec; the specs may differ only in their seed)."""
    spec = requests[0][1]
    before_loop, per_position, temperature, truncation = expected_source(spec, mode).split("\0")
    entries = []
    for (prompt, request_spec), context in zip(requests, contexts, strict=True):
        entries.append(
            {
                "prompt_token_ids": list(prompt),
                "sampling": sampling_kwargs(request_spec),
                "stop_token_ids": sorted(context.stop_token_ids),
                "bad_words_token_ids": [list(w) for w in context.bad_words_token_ids],
            }
        )

    def docstring_safe(text: str) -> str:
        return text.replace("\\", "\\\\").replace('"""', "'''")

    return _TEMPLATE.format(
        title=docstring_safe(title),
        what=docstring_safe(what.strip()) + "\n" if what.strip() else "",
        filename=filename,
        env=_literal(dict(env)),
        model=repr(str(model_path)),
        engine_kwargs=_literal(engine_arguments(engine_kwargs)),
        mode=repr(mode),
        bound=float(bound),
        requests=_literal(entries),
        before_loop=before_loop,
        per_position=per_position,
        temperature=temperature,
        truncation=truncation,
    )


def repro_filename(cell: str, test: str, text: str) -> str:
    """``repro-<cell>-<test>-<hash>.py`` (the hash of the script's text keeps distinct failures apart)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", test.split("::")[-1]).strip("-")[:60] or "check"
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"repro-{re.sub(r'[^A-Za-z0-9.]+', '-', cell)}-{slug}-{digest}.py"


def write_repro(directory: Path, *, cell: str, test: str, **render: Any) -> Path:
    """Write the script (see :func:`render_repro`) into ``directory`` (made if missing); its path."""
    directory.mkdir(parents=True, exist_ok=True)
    text = render_repro(filename="repro.py", **render)
    path = directory / repro_filename(cell, test, text)
    path.write_text(text.replace("python repro.py", f"python {path.name}"))
    return path
