#!/usr/bin/env bash
# Runs on a lent GPU machine after the offline vLLM bundle is installed (../shared/gpu/README.md):
#   bash scripts/gpu_session.sh noise   -> $OUT/noise-gpu.json, $OUT/noise-gpu.log
#   bash scripts/gpu_session.sh suite   -> $OUT/gpu.jsonl, $OUT/suite-gpu.log (pytest -m parity, GPU matrix)
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/device.txt" 2>&1
python3 -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)" >> "$OUT/device.txt" 2>&1
case "${1:-suite}" in
  noise)
    timeout ${BUDGET:-540} python3 benchmarks/noise.py --matrix conformance/fixtures/matrices/gpu.toml \
      --checks ${CHECKS:-30} --json "$OUT/noise-gpu.json" 2>&1 | grep -v " INFO \| WARNING " > "$OUT/noise-gpu.log"
    ;;
  suite)
    timeout ${BUDGET:-540} python3 -m pytest -p conformance.plugin conformance/suite -m parity \
      --parity-matrix conformance/fixtures/matrices/gpu.toml --parity-profile dev --parity-shrink false \
      --parity-results "$OUT/gpu.jsonl" -p no:cacheprovider -rxs ${PYTEST_ARGS:-} 2>&1 | grep -v " INFO \| WARNING " > "$OUT/suite-gpu.log"
    ;;
esac
tail -40 "$OUT"/*.log
