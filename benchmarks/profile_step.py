"""Kernel-level profile of one decode step (un-captured, so each kernel shows): which kernels, how many, how long.

python benchmarks/profile_step.py [--model 124m] [--batch 1] [--capacity 512] [--compile MODE]
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from mmgpt.bench.decode import build_model
from mmgpt.runtime.backends.torch_model import TorchBackend


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="124m")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--capacity", type=int, default=512)
    ap.add_argument("--backend", default="torch", choices=["torch", "torch-compile", "torch-triton"])
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    dev = torch.device("cuda")
    model = build_model(args.model, torch.float16, dev)
    if args.backend == "torch-triton":
        from mmgpt.runtime.backends.fused_triton import TritonBackend
        be = TritonBackend(model)
    else:
        be = TorchBackend(model, compile=args.backend == "torch-compile")
    c = model.config
    k = torch.zeros(c.n_layer, args.batch, c.n_head, args.capacity, c.head_dim, dtype=torch.float16, device=dev)
    v = torch.zeros_like(k)
    ids = torch.zeros(args.batch, 1, dtype=torch.long, device=dev)
    pos = torch.full((args.batch, 1), 160, dtype=torch.long, device=dev)  # mid-generation: 32 + 256 / 2
    with torch.inference_mode():
        for _ in range(3):
            be.decode(ids, pos, k, v)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                be.decode(ids, pos, k, v)
            torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    per_step = len(events) / args.steps
    total_us = sum(e.device_time for e in events) / args.steps
    print(f"{args.backend} {args.model} B={args.batch} S={args.capacity}: {per_step:.0f} kernels/step, "
          f"{total_us:.0f} us of kernel time/step")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
