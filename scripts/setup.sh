#!/usr/bin/env bash
# Creates .venv (once) and installs mmgpt with its test, notebook and TensorRT-RTX extras.
# torch is installed first, pinned to the CPU build this machine ships, so the project's `torch>=` range installs
# nothing more. On a GPU machine install the CUDA build of torch into .venv first; an installed torch is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
python -m pip install -q -e ".[train,export,dev,tensorrt-rtx]" 2>&1 | grep -v "^WARNING: Location" || true
python -c "import torch, lightning, hydra, onnx, onnx_graphsurgeon, onnxruntime, wandb, sklearn, tensorrt_rtx" \
  || { echo "setup.sh: the install above failed; see its messages" >&2; exit 1; }
