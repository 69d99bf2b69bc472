"""Kernel-level profile of one training step as `python -m mmgpt.bench train` runs it (compiled, bf16 autocast, fused
AdamW, clipping): GPU time per kernel class, to see what keeps a shape from its MFU target.

    python benchmarks/profile_train_step.py [--shape 124m-text] [--steps 3]
"""
import argparse
import re
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from mmgpt.bench.decode import build_model
from mmgpt.bench.train import SHAPES, make_batch, mmgpt_loss

# kernel-name patterns -> a class of work; the first that matches wins
CLASSES = [("attention", r"sdpa|flash|fmha|attention"), ("gemm", r"nvjet|gemm|cutlass|sm90_xmma|triton_mm|mm_"),
           ("optimizer", r"adam|multi_tensor_apply"), ("cross-entropy", r"cross_entropy|log_softmax|nll"),
           ("fused elementwise / norms (Triton)", r"^triton_"), ("other", r".")]


def classify(name: str) -> str:
    return next(c for c, pattern in CLASSES if re.search(pattern, name, re.IGNORECASE))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="124m-text", choices=[s for s in SHAPES if s != "smoke"])
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    dev = torch.device("cuda")
    shape = SHAPES[args.shape]
    torch.manual_seed(0)
    model = build_model(shape.size, torch.float32, dev, vocab=shape.vocab).train()
    model.activation_checkpointing = shape.activation_checkpointing
    batch = make_batch(shape, model.config.prefix_dim, dev)
    loss_fn = torch.compile(mmgpt_loss(model), dynamic=False)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(*batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

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
