"""Golden tensors: did a new engine build change what the trainer sees, by how much, and where?

Per (model, cell, case) a golden file holds what one build returned for a fixed, seeded case
(:data:`conformance.golden.GOLDEN_CASES`). This test replays each golden teacher-forced on the cell's
engine (the session's engine: no extra start) and fails when the new build drifts beyond the golden's
tolerance, or from the fp32 reference, or a greedy re-generation disagrees (see
:mod:`conformance.golden.replay`). ``--parity-record-golden`` (re)writes the goldens first.

A cell with no golden skips with the expected file and the record command; a golden that is listed but
missing, corrupt (hash mismatch) or incompatible (other model, dtype, mode) fails with one line naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conformance.engines.base import EngineFailure
from conformance.golden.store import (
    FORMAT_VERSION,
    GOLDEN_CASES,
    GOLDEN_PROMPTS,
    RECORD_COMMAND,
    GoldenError,
    GoldenStore,
    file_for,
    model_hash,
)
from conformance.matrix import Cell
from conformance.plugin.fixture import Parity
from conformance.versions import environment_versions

pytestmark = [pytest.mark.parity, pytest.mark.golden, pytest.mark.family("golden")]


@pytest.fixture(scope="session")
def golden_model_hashes() -> Any:
    """``get(model_dir)`` -> the model's content hash, computed once per session."""
    hashes: dict[Path, str] = {}

    def get(path: Path) -> str:
        if path not in hashes:
            hashes[path] = model_hash(path)
        return hashes[path]

    return get


def compatibility(cell: Cell, model_sha: str) -> dict[str, Any]:
    """What must be equal between record and verify (anything else, e.g. the vLLM version, may differ)."""
    return {
        "format": FORMAT_VERSION,
        "model_sha256": model_sha,
        "tier": cell.tier,
        "dtype": cell.dtype,
        "head_dtype": cell.head_dtype,
        "logprobs_mode": cell.logprobs_mode,
    }


@pytest.mark.parametrize("case_name", list(GOLDEN_CASES))
def test_golden(
    case_name: str,
    cell: Cell,
    parity: Parity,
    parity_config: Any,
    parity_model_path: Path,
    golden_model_hashes: Any,
) -> None:
    """The cell's engine reproduces the golden case within its tolerance (teacher-forced replay)."""
    from conformance.golden.replay import default_min_agreement, record_case, verify_case

    store = GoldenStore(parity_config.golden_dir)
    model = parity_model_path.name
    expect = compatibility(cell, golden_model_hashes(parity_model_path))
    versions = dict(parity.runner.recorder.versions) if parity.runner.recorder else environment_versions()
    try:
        if parity_config.record_golden:
            recorded = record_case(parity.runner, GOLDEN_CASES[case_name], GOLDEN_PROMPTS)
            info = {
                **expect,
                "model": model,
                "cell": cell.id,
                "versions": versions,
                "tolerance": dict(cell.tolerance.__dict__),
                "min_token_agreement": default_min_agreement(cell.dtype),
            }
            store.write(model, cell.id, case_name, recorded, info)
        if case_name not in store.entries_for(model, cell.id):
            pytest.skip(
                f"no golden for model {model!r} cell {cell.id!r} case {case_name!r}: expected "
                f"{file_for(store.root, model, cell.id, case_name)}; record with "
                f"`{RECORD_COMMAND} --parity-cells {cell.id}`"
            )
        golden, entry = store.read(model, cell.id, case_name, expect)
        verdict = verify_case(parity.runner, case_name, golden, entry, versions, parity.test)
    except GoldenError as exc:
        pytest.fail(str(exc), pytrace=False)
    except EngineFailure as exc:
        pytest.fail(
            f"ENGINE FAILURE [layer: engine] in cell {cell.id!r} (golden case {case_name!r}): {exc}", pytrace=False
        )
    assert verdict.passed, verdict.explain()
