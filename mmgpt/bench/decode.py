"""Decode-speed benchmark: mmgpt's decode loop against Hugging Face transformers, same weights, same GPU, one run.

python -m mmgpt.bench [decode] [--models 124m 355m 1p5b] [--dtypes fp16 bf16] [--batches 1 8] [--smoke]

Rows: mmgpt torch backend in a CUDA graph, with and without torch.compile; HF GPT2LMHeadModel eager, and with a
static cache + torch.compile. Each row reports tok/s, time to first token, GB/s and % of the memory-bandwidth floor
(copy bandwidth measured in the same run), and peak memory. The multimodal / text-only ratio compares the same
mmgpt decode loop with a 64-patch image prefix and with none. `--smoke` runs a tiny CPU configuration that only
checks the report is well formed (speed is never asserted anywhere).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import time
from pathlib import Path

import torch

from mmgpt.model import GPTConfig, MultimodalGPT
from mmgpt.runtime.backends.torch_model import TorchBackend
from mmgpt.runtime.generator import Generator
from mmgpt.tokenizer import ByteTokenizer

SHAPES = {  # GPT-2 shapes; vocab 50257 like GPT-2 so the head costs what it costs there
    "124m": dict(n_layer=12, n_head=12, n_embd=768),
    "355m": dict(n_layer=24, n_head=16, n_embd=1024),
    "1p5b": dict(n_layer=48, n_head=25, n_embd=1600),
    "smoke": dict(n_layer=2, n_head=2, n_embd=64),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
IMAGE_PREFIX = 64  # an 8x8 grid of patches
PATCH_DIM = 48  # a 4x4 RGB patch


def build_model(size: str, dtype, device, vocab: int = 50257, block: int = 1024) -> MultimodalGPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=vocab, block_size=block, prefix_dim=PATCH_DIM, **SHAPES[size])
    return MultimodalGPT(cfg).to(device=device, dtype=dtype).eval()


def weight_bytes(model: MultimodalGPT) -> int:
    """Bytes one decode step must read: every parameter once, except the position table (one row per token)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total - model.transformer.wpe.weight.numel() * model.transformer.wpe.weight.element_size()


def kv_bytes_used(model: MultimodalGPT, batch: int, start: int, steps: int, dtype) -> float:
    """Mean KV bytes a step must read: keys and values of the positions filled so far."""
    c = model.config
    mean_len = start + (steps - 1) / 2
    return 2 * c.n_layer * batch * c.n_embd * mean_len * torch.tensor([], dtype=dtype).element_size()


def copy_bandwidth(device) -> float:
    """Device-to-device copy, bytes read + written per second: the ceiling for a memory-bound step."""
    if device.type != "cuda":
        return float("nan")
    n = 1 << 30  # 1 GiB each way, far past L2
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    return 2 * n * 20 / (start.elapsed_time(end) / 1e3)


def to_hf_gpt2(model: MultimodalGPT):
    """The same weights as transformers' GPT2LMHeadModel (its Conv1D stores weights transposed)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    c = model.config
    hf_cfg = GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                        n_head=c.n_head, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, tie_word_embeddings=True)
    p = next(model.parameters())
    hf = GPT2LMHeadModel(hf_cfg).to(device=p.device, dtype=p.dtype).eval()
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith("prefix_encoder")}
    theirs = hf.state_dict()
    with torch.no_grad():
        for k, v in ours.items():
            if k not in theirs:
                continue
            transpose = k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) and ".h." in k
            theirs[k].copy_(v.t() if transpose else v)
    return hf


def _seconds(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def bench_mmgpt(be: TorchBackend, batch, prompt_len, new_tokens, prefix_len, device, repeats):
    model = be.model
    V = model.config.vocab_size
    gen = Generator(be, ByteTokenizer(bos_id=V - 1, eos_id=V - 1, pad_id=V - 1),
                    max_positions=model.config.block_size, eos_check_interval=new_tokens + 1)  # EOS never stops it
    g = torch.Generator().manual_seed(1)
    prefix = torch.randn(batch, prefix_len, model.config.prefix_dim, generator=g).to(device)
    prompts = torch.randint(0, V - 1, (batch, prompt_len), generator=g).tolist()
    gen.generate(prefix, prompts, max_new_tokens=new_tokens)  # warm-up: compile, capture, allocate
    runs = [gen.generate(prefix, prompts, max_new_tokens=new_tokens) for _ in range(repeats)]
    best = min(runs, key=lambda r: r.decode_time_s)
    return {"tokens_per_s": best.decode_tokens_per_s, "ttft_ms": 1e3 * min(r.time_to_first_token_s for r in runs),
            "step_ms": 1e3 * best.decode_time_s / best.decode_steps, "capacity": best.capacity,
            "graph_captures": gen.graph_captures, "cuda_graph": best.cuda_graph}


def bench_hf(hf, batch, prompt_len, new_tokens, static_compile, device, repeats):
    g = torch.Generator().manual_seed(1)
    V = hf.config.vocab_size
    ids = torch.randint(0, V - 1, (batch, prompt_len), generator=g).to(device)
    mask = torch.ones_like(ids)
    kw = dict(do_sample=False, pad_token_id=V - 1, eos_token_id=None)
    if static_compile:
        # transformers compiles the decoding forward itself when the cache is static (CompileConfig)
        from transformers import CompileConfig
        kw.update(cache_implementation="static", compile_config=CompileConfig(fullgraph=True, mode="reduce-overhead"))

    def run(n):
        return hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, **kw)
    with torch.inference_mode():
        run(1)  # warm-up: compilation and graph capture for prefill and decode (the static cache's length
        run(new_tokens)  # follows max_new_tokens, so the timed shape itself is warmed up)
        ttft = min(_seconds(lambda: run(1), device) for _ in range(repeats))
        total = min(_seconds(lambda: run(new_tokens), device) for _ in range(repeats))
    steps = new_tokens - 1
    return {"tokens_per_s": steps * batch / max(total - ttft, 1e-9), "ttft_ms": 1e3 * ttft,
            "step_ms": 1e3 * (total - ttft) / steps}


def versions(device) -> dict:
    v = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import transformers
        v["transformers"] = transformers.__version__
    except ImportError:
        v["transformers"] = None
    if device.type == "cuda":
        v["cuda"] = torch.version.cuda
        v["driver"] = _nvidia_smi("driver_version")
    return v


def _nvidia_smi(field):
    try:
        import subprocess
        return subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except Exception:
        return None


def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    bw = copy_bandwidth(device)
    rows = []
    for size in args.models:
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            model = build_model(size, dtype, device, vocab=args.vocab)
            wbytes = weight_bytes(model)
            hf = to_hf_gpt2(model) if args.hf else None
            # one backend per variant, shared by every batch and prefix: compiled code is reused where shapes match
            if device.type == "cuda":
                backends = {"mmgpt-graph": TorchBackend(model)}
                if args.compile:
                    backends["mmgpt-graph+compile"] = TorchBackend(model, compile=True)
                if args.triton:
                    from mmgpt.runtime.backends.fused_triton import TritonBackend
                    backends["mmgpt-graph+triton"] = TritonBackend(model)
            else:
                backends = {"mmgpt-eager-cpu": TorchBackend(model)}
            for batch in args.batches:
                def add(impl, res, prefix_len):
                    if "error" in res:
                        rows.append({"model": size, "dtype": dname, "batch": batch, "impl": impl,
                                     "prefix_len": prefix_len, "error": res["error"]})
                        print(f"{size:>5} {dname} B={batch} {impl:<24} FAILED: {res['error']}", flush=True)
                        return
                    kv = kv_bytes_used(model, batch, prefix_len + args.prompt, args.new_tokens, dtype)
                    step_s = res["step_ms"] / 1e3
                    row = {"model": size, "dtype": dname, "batch": batch, "impl": impl, "prefix_len": prefix_len,
                           "prompt_len": args.prompt, "new_tokens": args.new_tokens,
                           "tokens_per_s": round(res["tokens_per_s"], 1), "ttft_ms": round(res["ttft_ms"], 3),
                           "step_us": round(step_s * 1e6, 2), "weight_bytes": wbytes, "kv_bytes_per_step": int(kv),
                           "gb_per_s": round((wbytes + kv) / step_s / 1e9, 1)}
                    if bw == bw:  # measured (not NaN)
                        row["pct_of_floor"] = round(100 * (wbytes + kv) / bw / step_s, 1)
                    if device.type == "cuda":
                        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
                    for k in ("capacity", "graph_captures", "cuda_graph"):
                        if k in res:
                            row[k] = res[k]
                    rows.append(row)
                    print(f"{size:>5} {dname} B={batch} {impl:<24} P={prefix_len:<3} {row['tokens_per_s']:>10.1f} tok/s"
                          f"  ttft {row['ttft_ms']:8.2f} ms  {row.get('pct_of_floor', float('nan')):5.1f}% floor",
                          flush=True)
                    return res

                for name, backend in backends.items():
                    for prefix_len in (0, IMAGE_PREFIX):
                        _reset_peak(device)
                        res = _guard(lambda: bench_mmgpt(backend, batch, args.prompt, args.new_tokens, prefix_len,
                                                         device, args.repeats))
                        add(f"{name}/{'image' if prefix_len else 'text'}", res, prefix_len)
                    if "error" not in rows[-1] and "error" not in rows[-2]:
                        rows[-1]["multimodal_over_text"] = round(rows[-1]["tokens_per_s"] / rows[-2]["tokens_per_s"], 3)
                if hf is not None:
                    _reset_peak(device)
                    add("hf-eager", _guard(lambda: bench_hf(hf, batch, args.prompt, args.new_tokens, False, device,
                                                            args.repeats)), 0)
                    if device.type == "cuda" and args.compile:
                        _reset_peak(device)
                        add("hf-static+compile", _guard(lambda: bench_hf(hf, batch, args.prompt, args.new_tokens,
                                                                         True, device, args.repeats)), 0)
                if args.partial_out:  # keep what was measured if a later row takes the machine down
                    write_report(_report(args, device, gpu, bw, rows), Path(args.partial_out))
            del model, hf, backends
            torch._dynamo.reset()  # compiled graphs hold the model: free them before the next size
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return _report(args, device, gpu, bw, rows)


def _guard(fn) -> dict:
    """A failing variant becomes an `error` row instead of ending the whole run."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 -- recorded in the report, never hidden
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}


def _report(args, device, gpu, bw, rows) -> dict:
    return {"date": datetime.date.today().isoformat(), "gpu": gpu, "device": str(device), "tag": args.tag,
            "copy_bandwidth_gb_s": None if bw != bw else round(bw / 1e9, 1), "versions": versions(device),
            "settings": {"prompt_len": args.prompt, "new_tokens": args.new_tokens, "sampling": "greedy",
                         "image_prefix_len": IMAGE_PREFIX, "repeats": args.repeats, "vocab": args.vocab},
            "rows": rows}


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def markdown_table(report: dict) -> str:
    head = ("| model | dtype | batch | impl | tok/s | TTFT ms | GB/s | % floor | peak GiB | MM/text |\n"
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    lines = [f"{report['gpu']}, {report['date']}, copy bandwidth {report['copy_bandwidth_gb_s']} GB/s, "
             f"prompt {report['settings']['prompt_len']} + {report['settings']['new_tokens']} new tokens, greedy", "",
             head]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['dtype']} | {r['batch']} | {r['impl']} | failed: {r['error'][:80]} "
                         "| | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['dtype']} | {r['batch']} | {r['impl']} | {r['tokens_per_s']:.0f} | "
                     f"{r['ttft_ms']:.2f} | {r['gb_per_s']:.0f} | {r.get('pct_of_floor', '')} | "
                     f"{r.get('peak_mem_gib', '')} | {r.get('multimodal_over_text', '')} |")
    return "\n".join(lines)


def write_report(report: dict, out_dir: Path, table=markdown_table) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    gpu = report["gpu"].replace(" ", "-").replace("/", "-")
    tag = f"-{report['tag']}" if report.get("tag") else ""
    path = out_dir / f"{report['date']}-{gpu}{tag}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)
    md = path.with_suffix(".md")
    md.write_text(table(report) + "\n")
    return path


def merge_reports(paths: list[Path]) -> dict:
    """Several runs on one GPU (one process per model size fits the device's time limit) -> one report.
    Rows keep their source file; a later file's row replaces an earlier one with the same key."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    gpus = {r["gpu"] for r in reports}
    if len(gpus) != 1:
        raise ValueError(f"refusing to merge reports from different GPUs: {sorted(gpus)}")
    rows: dict[tuple, dict] = {}
    for path, report in zip(paths, reports):
        for row in report["rows"]:
            key = (row["model"], row["dtype"], row["batch"], row["impl"])
            rows[key] = {**row, "source": Path(path).name}
    base = reports[-1]
    merged = {**base, "tag": "", "merged_from": [Path(p).name for p in paths], "rows": list(rows.values())}
    if "copy_bandwidth_gb_s" in base:  # decode reports: each run measured its own
        merged["copy_bandwidth_gb_s_per_run"] = {Path(p).name: r["copy_bandwidth_gb_s"] for p, r in zip(paths, reports)}
    return merged


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["124m", "355m", "1p5b"], choices=list(SHAPES))
    ap.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=list(DTYPES))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--no-hf", dest="hf", action="store_false")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--no-triton", dest="triton", action="store_false", help="skip the fused Triton kernels")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run that checks the report's form")
    ap.add_argument("--merge", nargs="+", default=None, help="merge these result files into one report, run nothing")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default="", help="suffix of the result file name, e.g. the model sizes of this run")
    ap.add_argument("--partial-out", default=None, help="rewrite the report here after every model / dtype")
    args = ap.parse_args(argv)
    if args.merge:
        report = merge_reports([Path(p) for p in args.merge])
        print(f"wrote {write_report(report, Path(args.out))}")
        return report
    if args.smoke:
        args.models, args.dtypes, args.batches = ["smoke"], ["fp32"], [1, 2]
        args.new_tokens, args.prompt, args.repeats, args.vocab = 8, 4, 1, 512
    if args.hf and importlib.util.find_spec("transformers") is None:
        print("transformers is not installed: Hugging Face rows skipped (pip install -e .[bench])")
        args.hf = False
    report = run(args)
    path = write_report(report, Path(args.out))
    print(markdown_table(report))
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
