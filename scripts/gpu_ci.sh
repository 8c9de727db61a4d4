#!/usr/bin/env bash
# The GPU tier in one command (what a GPU CI runner and .github/workflows/parity-gpu.yml run): the parity
# suite over the GPU matrix with several engines side by side on the one GPU (pytest-xdist, one worker per
# group of cells: --dist loadgroup keeps a cell's tests on one worker, so each engine starts once), then
# the per-cell table (end of suite.log), the results JSONL, the time split and the Markdown report.
#
#   bash scripts/gpu_ci.sh [OUT_DIR] [extra pytest args...]      # OUT_DIR default: results/gpu
#   PARITY_GPU_WORKERS=6 (engines side by side)  PARITY_GPU_BUDGET_S=570 (wall limit of the suite)
#
# Writes OUT_DIR/{suite.log, gpu.jsonl, junit.xml, profile.md, profile.json, report/}. Exit status: pytest's.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/gpu}
shift || true
mkdir -p "$OUT"
WORKERS=${PARITY_GPU_WORKERS:-6}
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
start=$(date +%s)
timeout "${PARITY_GPU_BUDGET_S:-3600}" "$PY" -m pytest -p conformance.plugin conformance/suite -m parity \
  --parity-matrix conformance/fixtures/matrices/gpu.toml -n "$WORKERS" --dist loadgroup \
  --parity-results "$OUT/gpu.jsonl" --junitxml "$OUT/junit.xml" -p no:cacheprovider -rxs "$@" \
  > "$OUT/suite.log" 2>&1
code=$?
wall=$(( $(date +%s) - start ))
# a run stopped by the budget leaves the workers' own files: join them (the controller does this otherwise)
for part in "$OUT"/gpu.jsonl.gw*; do [ -f "$part" ] && cat "$part" >> "$OUT/gpu.jsonl" && rm "$part"; done
grep -v " INFO \| WARNING \|^(EngineCore\|^\[" "$OUT/suite.log" | tail -n 80
"$PY" benchmarks/suite_profile.py --from "$OUT/gpu.jsonl" --junit "$OUT/junit.xml" --wall "$wall" \
  --workers "$WORKERS" --json "$OUT/profile.json" > "$OUT/profile.md" 2>&1
cat "$OUT/profile.md"
# PARITY_GPU_REPORT=0 skips the report (minutes over a long run's JSONL; `python -m conformance report` makes it later)
if [ "${PARITY_GPU_REPORT:-1}" = 1 ]; then
  "$PY" -m conformance report "$OUT/gpu.jsonl" --out "$OUT/report" > /dev/null 2>&1 || echo "no report (no results?)"
fi
echo "gpu_ci: pytest exit code $code in ${wall} s"
exit $code
