"""The TRL matrix on real engines: GRPOConfig's sampling settings (framework_defaults.toml rows) x the
cells of parity_matrix.toml -> the kit's verdict must be the row's (pass, or the named layer and cause).

Also records TRL's own numbers on the same samples (``trainer_fn.grpo_per_token_logps`` vs the engine's
sampled values) and the IS diagnostics TRL / verl / NeMo-RL would log (PARITY_FRAMEWORK_RESULTS=...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trainer_fn
from parity_rows import DEFAULTS, ROWS, check_expectation, run_row

pytestmark = pytest.mark.parity


@pytest.mark.parametrize("row", ROWS, ids=[r["id"] for r in ROWS])
def test_row(row: dict[str, Any], parity_runner: Any, parity_model_path: Path, pytestconfig: pytest.Config) -> None:
    if parity_runner.cell.id not in row["expect"]:
        pytest.skip(f"row {row['id']!r} does not run on cell {parity_runner.cell.id!r}")
    declared = pytestconfig.getoption("parity_trainer") or pytestconfig.getini("parity_trainer")
    result = run_row(
        row,
        parity_runner,
        parity_model_path,
        trainer_fn.trainer_logits,
        declared,
        trainer_fn.grpo_per_token_logps,
        "trl",
        DEFAULTS["framework"]["version"],
    )
    print(f"{row['id']} on {result.cell}: {result.verdict}; kit: {result.kit_metrics}; {result.rl_summary}")
    check_expectation(row, result)
