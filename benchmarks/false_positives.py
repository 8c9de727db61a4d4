"""False-positive rate of the suite on clean engines: run its properties many times with fresh hypothesis
seeds (and fresh unseeded sampling) and count failures. A clean engine must give 0.

    .venv/bin/python benchmarks/false_positives.py --runs 20 --cells fp32-processed,bf16-processed

Every run calls the suite's own test functions on one long-lived engine per cell, with ``--examples``
hypothesis examples per property; the chi-square sampling test and the top-k distribution test run
once per run. Prints a table (family x cell: runs, checks, failures) and optionally writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from hypothesis import HealthCheck, settings
    from transformers import AutoTokenizer

    from conformance.matrix import load_matrix, select_cells
    from conformance.models import resolve_model
    from conformance.plugin import DEFAULT_MATRIX, DEFAULT_PROMPTS
    from conformance.reference import HFReference
    from conformance.runner import EngineHandle, ParityRunner, PromptSet
    from conformance.strategies import vocabulary_from_tokenizer
    from conformance.suite import test_distribution, test_inference_path, test_semantics

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--examples", type=int, default=20)
    parser.add_argument("--cells", default="fp32-processed,bf16-processed")
    parser.add_argument("--matrix", type=Path, default=DEFAULT_MATRIX)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    hyp = settings(max_examples=args.examples, deadline=None, database=None, derandomize=False,
                   suppress_health_check=list(HealthCheck))
    families: dict[str, Any] = {
        "semantic: all parameters": lambda r, v: test_semantics.test_logprobs_match_contract(r, v, hyp),
        "semantic: greedy argmax": lambda r, v: test_semantics.test_greedy_is_argmax_of_processed_logits(r, v, hyp),
        "inference-path: prefix cache": lambda r, v: test_inference_path.test_prefix_cache_hit_matches_cold(r, v, hyp),
        "inference-path: batch": lambda r, v: test_inference_path.test_batch_composition_does_not_change_logprobs(r, v, hyp),
        "distribution: top-20": lambda r, v: test_distribution.test_top_k_distribution_matches_reference(
            r, test_distribution.SamplingSpec(temperature=1.0, max_tokens=8, logprobs=20)),
        "distribution: chi-square sampling": lambda r, v: test_distribution.test_sampling_follows_reported_probabilities(r),
    }
    cells = select_cells(load_matrix(args.matrix), args.cells.split(","), str(args.matrix))
    counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    failures: list[str] = []
    start = time.perf_counter()
    for cell in cells:
        model = resolve_model("bundled" if cell.model == "bundled" else cell.model, Path(".parity-cache"))
        tokenizer = AutoTokenizer.from_pretrained(model)
        reference = HFReference(model)
        handle = EngineHandle(cell, model)
        runner = ParityRunner(handle, reference, PromptSet.load(DEFAULT_PROMPTS, tokenizer))
        vocab = vocabulary_from_tokenizer(tokenizer, reference.vocab_size)
        for run in range(args.runs):
            for name, call in families.items():
                counts[(name, cell.id)][0] += 1
                try:
                    call(runner, vocab)
                except AssertionError as exc:
                    counts[(name, cell.id)][1] += 1
                    failures.append(f"run {run} {cell.id} {name}: {str(exc).splitlines()[0]}")
                except BaseException as exc:  # skips and xfails are not false positives
                    if type(exc).__name__ not in ("Skipped", "XFailed"):
                        raise
            print(f"{cell.id} run {run + 1}/{args.runs} done ({time.perf_counter() - start:.0f} s)", flush=True)
        handle.close()
    print("\n| family | cell | runs | false positives |\n|---|---|---|---|")
    for (name, cell_id), (runs, fails) in counts.items():
        print(f"| {name} | {cell_id} | {runs} | {fails} |")
    for line in failures:
        print(line)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"counts": {f"{k[0]} | {k[1]}": v for k, v in counts.items()},
                                         "failures": failures, "examples": args.examples}, indent=1))


if __name__ == "__main__":
    main()
