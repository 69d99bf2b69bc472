#!/usr/bin/env bash
# Creates .venv (once) and installs mmgpt with its test, notebook, serving and TensorRT-RTX extras.
# torch is installed first, pinned to the CPU build this machine ships, so the project's `torch>=` range installs
# nothing more. On a GPU machine install the CUDA build of torch into .venv first; an installed torch is kept.
# Any failed install stops the script with pip's own message.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate

pip_install() {  # pip's exit status survives the filter (pipefail); only the venv-location warning is dropped
  python -m pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
}

pip_install --upgrade pip
python -c "import torch" 2>/dev/null || pip_install "torch==2.13.0"
pip_install -e ".[train,export,dev,serve,tensorrt-rtx]"
# every extra installed above, imported: a missing one fails here, not as a skipped test
python -c "import torch, lightning, hydra, onnx, onnx_graphsurgeon, onnxruntime, wandb, sklearn, tensorrt_rtx, \
transformers, triton, nbclient, matplotlib, ray.serve, fastapi, uvicorn, openai" \
  || { echo "setup.sh: a package installed above does not import; see the messages above" >&2; exit 1; }
