#!/usr/bin/env bash
# Drives a lent GPU machine (the device tool) for the kit's GPU tier; see README "GPU tier". Steps:
#   bash scripts/gpu_session.sh setup      # after .gpu/q00..q02 arrived in /tmp/parts: install the offline vLLM
#                                          # 0.26.0 bundle into /tmp/site (+ FlashInfer wheels from .gpu/fi if carried)
#   bash scripts/gpu_session.sh findings   # the standalone reproductions under docs/findings/ that need a GPU
#   bash scripts/gpu_session.sh suite [pytest args]    # scripts/gpu_ci.sh, goldens recorded, everything tarred
#   bash scripts/gpu_session.sh campaign [pytest args] # the same suite again (false-positive campaign, goldens verified)
# Outputs go to $OUT (the device tool brings back at most 8 files: each step tars its folder).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
step=${1:-suite}
shift || true
device() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)" 2>&1 | tail -1
}
case "$step" in
  flashinfer)
    # FlashInfer's wheels (carried in .gpu/fi) for the cells that keep vLLM's defaults; its sampling
    # kernels are JIT-compiled once in the background so that the engines find them cached.
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/fi/*.whl 2>&1 | grep -vi warn
    timeout 60 python3 -c "import flashinfer, flashinfer.sampling; print('flashinfer', flashinfer.__version__)" 2>&1 | tail -2
    setsid nohup timeout 900 python3 -c "
import torch, flashinfer.sampling as s
logits = torch.randn(16, 2048, device='cuda')
print(s.top_k_top_p_sampling_from_logits(logits, 20, 0.9).shape)" > /tmp/flashinfer-jit.log 2>&1 &
    ;;
  setup)
    cd /tmp/parts && cat q00 q01 q02 > b.tar && rm -rf /tmp/b /tmp/site && mkdir -p /tmp/b /tmp/site && tar -xf b.tar -C /tmp/b
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/b/*.whl 2>&1 | grep -vi warn
    tar -xJf /tmp/b/vllm-trim.tar.xz -C /tmp/site
    cd - > /dev/null
    if ls .gpu/fi/*.whl > /dev/null 2>&1; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/fi/*.whl 2>&1 | grep -vi warn
      timeout 60 python3 -c "import flashinfer, flashinfer.sampling; print('flashinfer', flashinfer.__version__)" 2>&1 | tail -2
    fi
    device | tee "$OUT/device.txt"
    ;;
  findings)
    device > "$OUT/device.txt"
    for script in docs/findings/vllm-0.26-*.py; do
      name=$(basename "$script" .py)
      timeout "${FINDINGS_BUDGET_S:-200}" python3 "$script" > "$OUT/$name.log" 2>&1
      echo "== $name (exit $?)"; grep -v " INFO \| WARNING " "$OUT/$name.log" | tail -n 40
    done
    ;;
  suite|campaign)
    work=/tmp/work-$step
    rm -rf "$work" && mkdir -p "$work"
    device > "$work/device.txt"
    extra=()
    [ "$step" = suite ] && extra=(--parity-record-golden --parity-golden-dir "$work/golden")
    # the campaign verifies the goldens the suite step recorded on this machine (or the committed ones)
    golden=golden; [ -d /tmp/work-suite/golden ] && golden=/tmp/work-suite/golden
    [ "$step" = campaign ] && extra=(--parity-golden-dir "$golden")
    PARITY_GPU_BUDGET_S=${PARITY_GPU_BUDGET_S:-560} bash scripts/gpu_ci.sh "$work" "${extra[@]}" "$@"
    code=$?
    tar -czf "$OUT/$step.tar.gz" -C "$work" .
    ls -la "$OUT"
    exit $code
    ;;
esac
