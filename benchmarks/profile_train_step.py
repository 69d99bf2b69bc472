"""Kernel-level profile of one training step as `python -m mmgpt.bench train` runs it, which is the module's own
step (MultimodalGPTModule's loss, compiled as train.py compiles it, its optimizer and schedule, clipping, bf16
autocast): GPU time per kernel class, to see what keeps a shape from its MFU target.

    python benchmarks/profile_train_step.py [--shape 124m-text] [--impl mmgpt-graph] [--steps 3]
"""
import argparse
import re
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from mmgpt.bench.train import MMGPT_IMPLS, SHAPES, build_module, make_batch, mmgpt_step

# kernel-name patterns -> a class of work; the first that matches wins
CLASSES = [("attention", r"sdpa|flash|fmha|attention"), ("gemm", r"nvjet|gemm|cutlass|sm90_xmma|triton_mm|mm_"),
           ("optimizer", r"adam|multi_tensor_apply"), ("cross-entropy", r"cross_entropy|log_softmax|nll"),
           ("fused elementwise / norms (Triton)", r"^triton_"), ("other", r".")]


def classify(name: str) -> str:
    return next(c for c, pattern in CLASSES if re.search(pattern, name, re.IGNORECASE))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="124m-text", choices=[s for s in SHAPES if s != "smoke"])
    ap.add_argument("--impl", default="mmgpt-compile", choices=list(MMGPT_IMPLS))
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    dev = torch.device("cuda")
    shape = SHAPES[args.shape]
    module = build_module(shape, dev).train()
    prefix, input_ids, targets = make_batch(shape, module.model.config.modality("image").dim, dev)
    batch = {"context": {"image": prefix}, "input_ids": input_ids, "targets": targets}
    step = mmgpt_step(module, args.impl, batch, dev, total_steps=3 + args.steps)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    per_class, per_kernel = defaultdict(float), defaultdict(lambda: [0.0, 0])
    for e in prof.key_averages():
        if e.self_device_time_total > 0:  # CUDA activity only: every event with device time is a kernel
            per_class[classify(e.key)] += e.self_device_time_total / args.steps / 1e3
            per_kernel[e.key][0] += e.self_device_time_total / args.steps / 1e3
            per_kernel[e.key][1] += e.count // args.steps
    total = sum(per_class.values())
    print(f"{args.shape}: GPU time per step {total:.2f} ms (kernels only)")
    for c, ms in sorted(per_class.items(), key=lambda kv: -kv[1]):
        print(f"  {c:<38} {ms:7.2f} ms  {100 * ms / total:5.1f}%")
    print("top kernels (ms per step, launches per step):")
    for name, (ms, n) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:25]:
        print(f"  {ms:7.3f} ms  x{n:<4} {name[:110]}")


if __name__ == "__main__":
    main()
