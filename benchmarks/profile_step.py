"""Kernel-level profile of one decode step (un-captured, so each kernel shows): which kernels, how many, how long.

python benchmarks/profile_step.py [--model 124m] [--batch 1] [--capacity 1024] [--positions 160 700] [--out F.json]

Each position is every row's cache length for the profiled steps (160: mid-generation of prompt 32 + 256 new tokens;
700: the same after a 576-patch image), so two positions show what a long context adds, kernel by kernel.
"""
import argparse
import datetime
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from mmgpt.bench.decode import build_model, versions
from mmgpt.bench.results import git_commit
from mmgpt.files import write_json
from mmgpt.runtime.backends.torch_model import TorchBackend


def kernels_per_step(be, c, batch: int, capacity: int, position: int, steps: int, device) -> dict:
    """{kernel name: (launches, us)} per step at one cache length."""
    k = torch.zeros(c.n_layer, batch, c.n_kv_head, capacity, c.head_dim, dtype=torch.float16, device=device)
    v = torch.zeros_like(k)
    ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
    pos = torch.full((batch, 1), position, dtype=torch.long, device=device)
    with torch.inference_mode():
        for _ in range(3):
            be.decode(ids, pos, k, v)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                be.decode(ids, pos, k, v)
            torch.cuda.synchronize()
    table = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            table[e.name][0] += 1
            table[e.name][1] += e.device_time
    return {name: (n / steps, us / steps) for name, (n, us) in sorted(table.items(), key=lambda kv: -kv[1][1])}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="124m")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--capacity", type=int, default=1024)
    ap.add_argument("--positions", nargs="+", type=int, default=[160])
    ap.add_argument("--backend", default="torch-triton", choices=["torch", "torch-compile", "torch-triton"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=None, help="write the report (a row per position) to this JSON file")
    args = ap.parse_args()
    dev = torch.device("cuda")
    model = build_model(args.model, torch.float16, dev, block=args.capacity)
    if args.backend == "torch-triton":
        from mmgpt.runtime.backends.fused_triton import TritonBackend
        be = TritonBackend(model)
    else:
        be = TorchBackend(model, compile=args.backend == "torch-compile")
    rows = []
    for position in args.positions:
        table = kernels_per_step(be, model.config, args.batch, args.capacity, position, args.steps, dev)
        total = sum(us for _, us in table.values())
        launches = sum(n for n, _ in table.values())
        print(f"{args.backend} {args.model} B={args.batch} S={args.capacity} position {position}: "
              f"{launches:.0f} kernels/step, {total:.0f} us of kernel time/step")
        for name, (n, us) in list(table.items())[:8]:
            print(f"  {us:9.1f} us  {n:5.0f} x  {name[:90]}")
        rows.append({"model": args.model, "batch": args.batch, "capacity": args.capacity, "position": position,
                     "backend": args.backend, "kernel_us_per_step": total, "launches_per_step": launches,
                     "kernels": {k: {"launches": n, "us": us} for k, (n, us) in table.items()}})
    if args.out:
        write_json(args.out, {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(),
                              "commit": git_commit(), "versions": versions(dev),
                              "tool": "benchmarks/profile_step.py (un-captured decode steps, kernel time per step)",
                              "rows": rows})

if __name__ == "__main__":
    main()
