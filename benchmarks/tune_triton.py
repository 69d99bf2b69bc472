"""Tile-size sweep for the fused Triton decode kernels, timed as the generator runs them (one CUDA graph per step).

python benchmarks/tune_triton.py [--models 124m 1p5b] [--batches 1 8]
"""
import argparse
import json

import torch

from mmgpt.bench.decode import bench_mmgpt, build_model
from mmgpt.runtime.backends.fused_triton import AttentionConfig, GemvConfig, TritonBackend


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["124m", "1p5b"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--out", default=None)
    ap.add_argument("--prefix", type=int, default=0, help="image-prefix length (attention reads it every step)")
    ap.add_argument("--attention", nargs="+", type=lambda s: tuple(int(v) for v in s.split(",")), default=[(128, 8)],
                    help="BLOCK_S,num_warps[,min_programs,max_splits] (AttentionConfig fields)")
    ap.add_argument("--grid", nargs="+", type=lambda s: tuple(int(v) for v in s.split(",")),
                    default=[(32, 256, 4)],
                    help="BLOCK_N,BLOCK_K,num_warps[,max_block_b,...] (GemvConfig fields, in order)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    results = []
    grid = [GemvConfig(*cfg) for cfg in args.grid]
    for size in args.models:
        model = build_model(size, torch.float16, dev)
        for batch in args.batches:
            best = None
            for cfg in grid:
                for attention in (AttentionConfig(*a) for a in args.attention):
                    be = TritonBackend(model, gemv=cfg, attention=attention)
                    r = bench_mmgpt(be, batch, 32, args.new_tokens, args.prefix, dev, repeats=2)
                    row = {"model": size, "batch": batch, "block_n": cfg.block_n, "block_k": cfg.block_k,
                           "num_warps": cfg.num_warps, "row_block_n": cfg.row_block_n,
                           "block_s": attention.block_s, "attn_warps": attention.num_warps,
                           "max_splits": attention.max_splits, "prefix": args.prefix,
                           "tokens_per_s": round(r["tokens_per_s"], 1), "step_us": round(r["step_ms"] * 1e3, 1)}
                    results.append(row)
                    print(json.dumps(row), flush=True)
                    if best is None or row["tokens_per_s"] > best["tokens_per_s"]:
                        best = row
            print("best", json.dumps(best), flush=True)
        del model
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
