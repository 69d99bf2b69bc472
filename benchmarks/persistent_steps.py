"""One decode step of the persistent kernel and its variants beside torch-triton's, each captured in a CUDA graph and
replayed (µs per step), plus greedy-token agreement with torch-triton on the same random weights. GPU only.

python benchmarks/persistent_steps.py --out DIR [--models 124m 1p5b] [--batches 1 8] [--prefixes 0 576]

Variants change one setting of the persistent backend (ring slots, attention splits); two diagnostics time the same
table without its waits (memory and compute alone) and without its weight copies (the dependency path alone), so
the per-step budget in benchmarks/NOTES.md is measured piece by piece. Writes DIR/persistent-steps.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
from pathlib import Path

import torch

from mmgpt.bench.decode import build_model, copy_bandwidth, kv_bytes_used, versions, weight_bytes
from mmgpt.bench.results import git_commit
from mmgpt.kernels.persistent import ARG1, GEMV, OP, WAIT
from mmgpt.runtime.backends.fused_triton import TritonBackend
from mmgpt.runtime.backends.persistent import PersistentBackend
from mmgpt.runtime.generator import Generator
from mmgpt.tokenizer import ByteTokenizer

VARIANTS = {"persistent": {}, "slots4": {"slots": 4}, "slots8": {"slots": 8}, "splits1": {"splits": 1},
            "nowait": {}, "noweights": {}}
# diagnostics, not results: the same table with every counter wait removed (memory and compute alone; the outputs
# race) or with no weight rows copied (the dependency path and compute alone; the outputs are garbage)
DIAGNOSTICS = {"nowait": lambda items: items[:, WAIT].fill_(-1),
               "noweights": lambda items: items[:, ARG1].masked_fill_(items[:, OP] == GEMV, 0)}


def step_us(backend, batch: int, prefix: int, capacity: int, replays: int = 200, diagnostic=None) -> float:
    """Median µs of one captured decode step at positions prefix + 32 + 128 (the benchmark's mean position);
    `diagnostic` edits the persistent backend's item table in place first."""
    c = backend.model.config
    if diagnostic is not None:
        diagnostic(backend.plan(batch, capacity).items)
    k = torch.randn(c.n_layer, batch, c.n_head, capacity, c.head_dim, device="cuda").half()
    v = torch.randn_like(k)
    ids = torch.randint(0, c.vocab_size, (batch, 1), device="cuda")
    pos = torch.full((batch, 1), prefix + 32 + 128, device="cuda")
    backend.decode(ids, pos, k, v)  # plans, compiles, allocates outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        backend.decode(ids, pos, k, v)
    for _ in range(10):
        graph.replay()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / replays)
    return statistics.median(times)


def greedy_agreement(model, batch: int, new_tokens: int = 64) -> dict:
    """Greedy tokens of torch-triton and the persistent kernel, both under the generator's CUDA graph."""
    V = model.config.vocab_size
    tok = ByteTokenizer(bos_id=V - 1, eos_id=V - 1, pad_id=V - 1)
    g = torch.Generator().manual_seed(3)
    prompts = torch.randint(0, V - 1, (batch, 32), generator=g).tolist()
    prefix = torch.zeros(batch, 0, 48, device="cuda")
    runs = {}
    for name, backend in (("triton", TritonBackend(model)), ("persistent", PersistentBackend(model))):
        gen = Generator(backend, tok, max_positions=model.config.block_size, eos_check_interval=new_tokens + 1)
        runs[name] = [gen.generate(prefix, prompts, max_new_tokens=new_tokens).tokens for _ in range(2)]
    same = runs["persistent"][0] == runs["triton"][0]
    return {"batch": batch, "tokens": new_tokens, "equal_fraction": same.float().mean().item(),
            "first_difference": None if same.all() else int((~same).any(0).int().argmax()),
            "replay_reproducible": bool(torch.equal(runs["persistent"][0], runs["persistent"][1]))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", nargs="+", default=["124m", "1p5b"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--prefixes", nargs="+", type=int, default=[0, 576])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()
    bw = copy_bandwidth(torch.device("cuda"))
    # "steps", not "rows": the notebooks read reports with rows as decode-benchmark tables
    report = {"gpu": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
              "tag": "persistent-steps", "versions": versions(torch.device("cuda")), "commit": git_commit(),
              "copy_bandwidth_gb_s": round(bw / 1e9, 1), "steps": [], "greedy": []}
    for size in args.models:
        model = build_model(size, torch.float16, "cuda")
        wb = weight_bytes(model)
        for batch in args.batches:
            for prefix in args.prefixes:
                capacity = 1024
                floor = (wb + kv_bytes_used(model, batch, prefix + 32, 256, torch.float16)) / bw * 1e6
                row = {"model": size, "batch": batch, "prefix": prefix, "floor_us": round(floor, 1),
                       "torch-triton": round(step_us(TritonBackend(model), batch, prefix, capacity), 1)}
                for name in args.variants:
                    row[name] = round(step_us(PersistentBackend(model, **VARIANTS[name]), batch, prefix, capacity,
                                              diagnostic=DIAGNOSTICS.get(name)), 1)
                print(json.dumps(row), flush=True)
                report["steps"].append(row)
        if size == "124m":
            for batch in args.batches:
                report["greedy"].append(greedy_agreement(model, batch))
                print(json.dumps(report["greedy"][-1]), flush=True)
        del model
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "persistent-steps.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
