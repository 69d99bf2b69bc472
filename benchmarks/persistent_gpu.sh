#!/bin/bash
# One GPU call for the persistent decode kernel: build, GPU tests, step timings and variants, then (with FULL=1) the
# decode benchmark beside torch-triton and Hugging Face. Everything lands in $OUT (default ./gpu-out).
# Run from the repository root: bash benchmarks/persistent_gpu.sh
set -o pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > "$OUT/nvidia-smi.txt" 2>&1
{ time timeout 120 python3 -c "from mmgpt.runtime.backends.persistent import extension; print(extension())"; } \
    > "$OUT/build.log" 2>&1 || { cat "$OUT/build.log"; exit 1; }
# a deadlocked persistent kernel never returns: one step first, under a short timeout, before anything else
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -m gpu -x \
    -k "test_persistent_step_matches_the_fused_kernels and 124m-0-1" 2>&1 | tee "$OUT/first-step.log" | tail -5 \
    || { echo "first persistent step failed or hung"; exit 1; }
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -m gpu -k "persistent" -rs 2>&1 \
    | tee "$OUT/gpu-tests.log" | tail -15
timeout ${STEPS_TIMEOUT:-240} python3 benchmarks/persistent_steps.py --out "$OUT" ${STEPS_ARGS} 2>&1 \
    | tee "$OUT/steps.log" | tail -30
if [ -n "$FULL" ]; then
  timeout 420 python3 -m mmgpt.bench --models 124m 1p5b --dtypes fp16 --batches 1 8 --prefixes 0 576 \
      --skip mmgpt-graph+compile mmgpt-graph hf-eager --out "$OUT" --tag persistent 2>&1 | tee "$OUT/bench.log" | tail -40
fi
