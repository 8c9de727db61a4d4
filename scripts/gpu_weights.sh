#!/usr/bin/env bash
# Weight-update tier on a lent GPU (after scripts/gpu_setup3.sh): the probe on the fp32 and bf16 GPU cells,
# then the suite's weight-update family on the fp32-head cell. Writes under $OUT.
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/device.txt" 2>&1
python3 -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)" >> "$OUT/device.txt" 2>&1
timeout 300 python3 benchmarks/weight_update_probe.py --matrix conformance/fixtures/matrices/gpu.toml \
  --cells gpu-fp32-processed,gpu-bf16-processed --device cuda --json "$OUT/weight-update-gpu.json" \
  --md "$OUT/weight-update-gpu.md" 2>&1 | grep -v " INFO \| WARNING \|Loading weights" > "$OUT/probe.log"
timeout 240 python3 -m pytest -p conformance.plugin conformance/suite/test_weight_update.py -m parity \
  --parity-matrix conformance/fixtures/matrices/gpu.toml --parity-cells gpu-bf16-processed-head32 \
  -p no:cacheprovider -rxs 2>&1 | grep -v " INFO \| WARNING " > "$OUT/suite-weights-gpu.log"
tail -30 "$OUT"/*.log
