"""Where a prefill's time goes: 124M fp16, one row, a 576-patch image and an 8-token prompt (the serving TTFT case).

Times the torch backend's prefill eager, replayed from a CUDA graph, compiled (torch.compile, then captured), and
with causal SDPA (flash) instead of the explicit-score attention for a prefill without a past; sums the GPU
kernel time of one eager prefill from the profiler, so launch gaps and kernel work separate.

python benchmarks/profile_prefill.py --out <dir>   (writes <dir>/prefill-profile.json)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import mmgpt.model as model_module
from mmgpt.bench.decode import build_model


def timed(fn, repeats: int = 50) -> float:
    """Median milliseconds of fn() with the GPU synchronised around each call."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - t))
    return sorted(times)[len(times) // 2]


def captured(fn):
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def sdpa_prefill_attention(q, k, v, past_k, past_v, mask):
    """Causal SDPA where there is no past: exact for a row-aligned context (no ragged packing), padding last."""
    if past_k is not None:
        return ORIGINAL(q, k, v, past_k, past_v, mask)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


ORIGINAL = model_module.cached_attention


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="124m")
    ap.add_argument("--prefix", type=int, default=576)
    ap.add_argument("--prompt", type=int, default=8)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dev = torch.device("cuda")
    model = build_model(args.model, torch.float16, dev)
    dim = model.config.context_modalities[0].dim
    context = {"image": torch.randn(1, args.prefix, dim, device=dev, dtype=torch.float16)}
    ids = torch.randint(0, 50000, (1, args.prompt), device=dev)
    lengths = torch.full((1,), args.prompt, device=dev)
    start = torch.zeros_like(lengths)

    def prefill(m=model):
        with torch.no_grad():
            return m.forward_cached(context, ids, lengths, start, None, None)

    want = prefill()[0]
    rows = {"eager": timed(prefill), "captured": timed(captured(prefill))}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        prefill()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_ms = sum(e.self_device_time_total for e in events) / 1e3
    top = sorted(events, key=lambda e: -e.self_device_time_total)[:12]
    kernels = [{"name": e.key[:90], "calls": e.count, "ms": round(e.self_device_time_total / 1e3, 4)} for e in top]
    launches = sum(e.count for e in events)

    model_module.cached_attention = sdpa_prefill_attention
    got = prefill()[0]
    rows["captured_sdpa"] = timed(captured(prefill))
    sdpa_diff = float((got.float() - want.float()).abs().max())

    compiled = torch.compile(model.forward_cached, dynamic=False)

    def compiled_prefill():
        with torch.no_grad():
            return compiled(context, ids, lengths, start, None, None)

    compiled_prefill()
    rows["compiled_captured_sdpa"] = timed(captured(compiled_prefill))
    compiled_diff = float((compiled_prefill()[0].float() - want.float()).abs().max())
    model_module.cached_attention = ORIGINAL

    commit = os.environ.get("MMGPT_COMMIT") or subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                                              capture_output=True, text=True).stdout.strip()
    report = {"gpu": torch.cuda.get_device_name(dev), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "commit": commit or None, "model": args.model, "prefix": args.prefix, "prompt": args.prompt,
              "prefill_ms": {k: round(v, 4) for k, v in rows.items()}, "eager_kernel_ms": round(kernel_ms, 4),
              "eager_kernel_launches": launches, "top_kernels": kernels,
              "max_abs_logit_diff": {"sdpa": sdpa_diff, "compiled_sdpa": compiled_diff}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefill-profile.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
