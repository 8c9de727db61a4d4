#!/usr/bin/env bash
# Weight-update tier on a lent GPU (after scripts/gpu_session.sh setup): the probe on the fp32, bf16 and IPC
# weight-transfer GPU cells, then the suite's weight-update family on the fp32-head and IPC cells. Writes under $OUT.
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/device.txt" 2>&1
python3 -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)" >> "$OUT/device.txt" 2>&1
timeout 330 python3 benchmarks/weight_update_probe.py --matrix conformance/fixtures/matrices/gpu.toml \
  --cells ${PROBE_CELLS:-gpu-fp32-processed,gpu-bf16-processed,gpu-bf16-processed-wt-ipc} --device cuda --json "$OUT/weight-update-gpu.json" \
  --md "$OUT/weight-update-gpu.md" 2>&1 | grep -v " INFO \| WARNING \|Loading weights" > "$OUT/probe.log"
timeout 220 python3 -m pytest -p conformance.plugin conformance/suite/test_weight_update.py -m parity \
  --parity-matrix conformance/fixtures/matrices/gpu.toml --parity-cells gpu-bf16-processed-head32,gpu-bf16-processed-wt-ipc \
  -p no:cacheprovider -rxs 2>&1 | grep -v " INFO \| WARNING " > "$OUT/suite-weights-gpu.log"
for f in "$OUT"/*.log; do echo "== $f"; tail -n 30 "$f"; done
