"""Where the time to first token goes in the in-flight engine: 124M fp16, one row, a 576-patch image and a
one-token prompt (the serving TTFT case), prefills captured.

Times `submit` (the request's checks and its features' copy to the GPU) and the admission (`step(max_steps=0)`:
the captured join and the host's read of the first token) separately, then profiles twenty admissions and lists
the host operators that take the most CPU time, so what is left over the prefill's kernels shows by name.

python benchmarks/profile_ttft.py --out <dir>   (writes <dir>/ttft-profile.json)
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mmgpt.bench.decode import build_model
from mmgpt.bench.serving import open_backend_for
from mmgpt.runtime.inflight import InflightEngine, Request
from mmgpt.tokenizer import ByteTokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="124m")
    ap.add_argument("--backend", default="torch-triton")
    ap.add_argument("--prefix", type=int, default=576)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    device = torch.device("cuda")
    tok = ByteTokenizer(bos_id=50256, eos_id=50256, pad_id=50256)
    model = build_model(args.model, torch.float16, device, vocab=50257, block=1024)
    engine = InflightEngine(open_backend_for(model, args.backend), tok, rows=1, capacity=1024)
    prefix = torch.rand(args.prefix, model.config.context_modalities[0].dim)
    phases = {"submit": [], "admit": [], "total": []}

    def one():
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        engine.submit(Request(prefix, [tok.bos_id], 1))
        t1 = time.perf_counter()
        engine.step(max_steps=0)
        t2 = time.perf_counter()
        engine.run()
        return t1 - t0, t2 - t1, t2 - t0

    for _ in range(3):  # captures and settles
        one()
    for _ in range(args.repeats):
        for name, t in zip(phases, one()):
            phases[name].append(1e3 * t)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            one()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:25]
    report = {"gpu": torch.cuda.get_device_name(device), "model": args.model, "backend": args.backend,
              "prefix": args.prefix, "torch": torch.__version__,
              "median_ms": {k: statistics.median(v) for k, v in phases.items()},
              "host_ops_per_admission": [{"op": e.key, "calls": e.count / 20,
                                          "self_cpu_us": e.self_cpu_time_total / 20,
                                          "device_us": getattr(e, "self_device_time_total", 0) / 20} for e in ops]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ttft-profile.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report["median_ms"]), flush=True)
    for row in report["host_ops_per_admission"][:15]:
        print(f"{row['self_cpu_us']:9.1f} us  {row['calls']:5.1f} x  {row['device_us']:8.1f} us dev  {row['op']}")


if __name__ == "__main__":
    main()
