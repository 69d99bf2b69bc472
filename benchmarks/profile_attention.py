"""The decode attention kernel alone: microseconds a launch, captured as the generator captures it, by shape, RoPE,
split count and cache length.

python benchmarks/profile_attention.py [--models qwen2p5_0p5b 124m] [--splits 1 2 4 8] [--positions 160 700]
    [--out F.json]

Each row is one layer's attention for batch 1 (or --batch), launched --launches times back to back inside one CUDA
graph, so a launch's time includes the gap between graph nodes, as in a decode step. `rope` off runs a Llama-family
shape without its rotation: the difference is what RoPE costs a launch.
"""
import argparse
import datetime

import torch
import triton

from mmgpt.bench.decode import PATCH_DIM, shape_fields, versions
from mmgpt.bench.results import git_commit
from mmgpt.files import write_json
from mmgpt.kernels.decode_step import attention_kernel
from mmgpt.model import GPTConfig, image_to_text, rope_inv_freq


def time_launches(c, batch: int, capacity: int, position: int, splits: int, rope: bool, launches: int,
                  block_s: int, warps: int, device) -> float:
    """us per launch of one layer's attention, `launches` of them in one captured graph."""
    group = triton.next_power_of_2(c.n_head // c.n_kv_head)
    qkv = torch.randn(batch, (c.n_head + 2 * c.n_kv_head) * c.head_dim, device=device, dtype=torch.float16)
    k = torch.randn(batch, c.n_kv_head, capacity, c.head_dim, device=device, dtype=torch.float16)
    v = torch.randn_like(k)
    pos = torch.full((batch,), position, device=device, dtype=torch.long)
    inv_freq = rope_inv_freq(c, device) if rope else torch.zeros(1, device=device)
    y = torch.empty(batch, c.n_head * c.head_dim, device=device, dtype=torch.float16)
    parts = batch * c.n_kv_head * splits * group
    part_max, part_sum = (torch.empty(parts, device=device) for _ in range(2))
    part_out = torch.empty(parts, c.head_dim, device=device)
    arrivals = torch.zeros(batch * c.n_kv_head, device=device, dtype=torch.int32)

    def launch():
        attention_kernel[(batch * c.n_kv_head, splits)](
            qkv, k, v, pos, inv_freq, y, part_max, part_sum, part_out, arrivals, capacity, c.head_dim ** -0.5,
            H=c.n_head, H_KV=c.n_kv_head, D=c.head_dim, GROUP=group, ROWS=max(16, group), BLOCK_S=block_s,
            NUM_SPLITS=splits, ROPE=rope, IEEE=False, USE_PDL=False, num_warps=warps, num_stages=3)

    launch()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            launch()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / launches)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["qwen2p5_0p5b", "smollm2_135m", "llama3p2_1b", "124m"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--capacity", type=int, default=1024)
    ap.add_argument("--positions", nargs="+", type=int, default=[160, 700])
    ap.add_argument("--splits", nargs="+", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--block-s", type=int, default=128)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--launches", type=int, default=200)
    ap.add_argument("--out", default=None, help="write the rows to this JSON file")
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows = []
    for name in args.models:
        c = GPTConfig(**shape_fields(name, 50257), block_size=args.capacity, **image_to_text(PATCH_DIM))
        ropes = [True, False] if c.family == "llama" else [False]
        for position in args.positions:
            for splits in args.splits:
                for rope in ropes:
                    us = time_launches(c, args.batch, args.capacity, position, splits, rope, args.launches,
                                       args.block_s, args.warps, dev)
                    rows.append({"model": name, "batch": args.batch, "capacity": args.capacity, "position": position,
                                 "splits": splits, "rope": rope, "us_per_launch": us})
                    print(f"{name:14s} B={args.batch} pos {position:4d} splits {splits:2d} rope {rope!s:5s} "
                          f"{us:6.2f} us", flush=True)
        torch.cuda.empty_cache()
    if args.out:
        write_json(args.out, {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(),
                              "commit": git_commit(), "versions": versions(dev),
                              "tool": "benchmarks/profile_attention.py (one layer's attention, captured launches)",
                              "settings": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
