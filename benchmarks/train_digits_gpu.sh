#!/usr/bin/env bash
# The GPU experiment through the user's entry point, end to end, in one call of a few minutes:
#   bash benchmarks/train_digits_gpu.sh [more Hydra overrides]
# Installs hydra-core, omegaconf and antlr4 from the wheels in $WHEELS where they are missing; logs to CSV (no W&B
# needed). Prints step time, tok/s, MFU, peak memory, the first step's time (compilation), exact match, the
# checkpoint, and the wall time of the whole command.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! "$PY" -c "import hydra, omegaconf" 2>/dev/null; then
  : "${WHEELS:?hydra-core is missing: set WHEELS to a directory with hydra-core, omegaconf, antlr4 wheels}"
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" hydra-core omegaconf antlr4-python3-runtime
fi
# torch.compile says under one of these (which one depends on the torch version) when it could not replay its
# CUDA graphs: "skipping cudagraphs due to ..."
export TORCH_LOGS=${TORCH_LOGS:-cudagraphs,perf_hints}
out=${OUT_DIR:-outputs/train/gpu-digits-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
start=$(date +%s)
"$PY" train.py +experiment=digits_gpt2_124m logger=csv \
  hydra.run.dir="$out" "$@" 2>&1 | tee "$out/console.log"
echo "wall time of the command: $(( $(date +%s) - start )) s (start-up, compilation, training, validation, checkpoints)"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
