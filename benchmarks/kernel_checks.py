"""Checks and A/B timings of the fused Triton decode kernels on one GPU, in one run of about 6 minutes (H100):

    python benchmarks/kernel_checks.py --out DIR [--budget-s 420]

Random-weight GPT-2 shapes, fp16. In order of priority (anything past the time budget is listed as skipped):
1. PDL smoke check: one step with programmatic dependent launch equals one without; if PDL fails, the rest runs
   without it. Then graph-replayed tokens equal un-captured tokens (PDL edges inside a CUDA graph).
2. Step agreement with the torch backend, 124M then 1.5B, B in (1, 8, 64, 256), P in (0, 64, 576): three
   teacher-forced decode steps from a cache of random keys / values, ragged positions P + 1..32. Reported: the
   largest |Triton - torch| step logit over the largest |torch logit|, the fraction of equal greedy tokens, and the
   written cache slots' difference. The capacity is the generator's bucket for a 32 + 256-token generation; where
   that cache does not fit the GPU (1.5B, B=256, P=576: 80 GB) the smallest capacity that holds the positions.
3. A/B timings through the generator (CUDA graph, prompt 32 + 128 new tokens): attention split vs one program per
   (row, head) (both without PDL) at P = 0 / 64 / 576, PDL off vs on, a 124M batch sweep at P=64 against mmgpt's
   torch graph, and wider GEMM / attention tiles at large batch.
Writes DIR/<date>-<gpu>-kernel-checks.json after every section and prints a short table last.
"""
from __future__ import annotations

import argparse
import datetime
import json
import time
from functools import partial
from pathlib import Path

import torch
import triton

from mmgpt.bench.results import git_commit, result_path
from mmgpt.files import write_json
from mmgpt.bench.decode import bench_mmgpt, build_model, kv_bytes_used, versions, weight_bytes
from mmgpt.runtime.backends.torch_model import TorchBackend
from mmgpt.runtime.generator import DEFAULT_BUCKETS, Generator
from mmgpt.runtime.backends.fused_triton import AttentionConfig, GemvConfig, TritonBackend
from mmgpt.tokenizer import ByteTokenizer

PROMPT, NEW_TOKENS = 32, 128
BATCHES, PREFIXES = (1, 8, 64, 256), (0, 64, 576)
SWEEP_BATCHES = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)
UNSPLIT = AttentionConfig(max_splits=1)
DEVICE = torch.device("cuda")


class Run:
    """The report being written, and the time budget every item asks before it starts."""

    def __init__(self, out: Path, budget_s: float):
        self.t0, self.budget_s = time.perf_counter(), budget_s
        self.report = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(DEVICE),
                       "commit": git_commit(),
                       "versions": {**versions(DEVICE), "triton": triton.__version__},
                       "settings": {"dtype": "fp16", "weights": "random", "prompt_len": PROMPT,
                                    "new_tokens": NEW_TOKENS, "budget_s": budget_s},
                       "pdl": {}, "graph_replay": [], "agreement": [], "timing": [], "skipped": []}
        self.path = result_path(out, self.report["date"], self.report["gpu"], "kernel-checks")

    def has_time(self, what: str) -> bool:
        if time.perf_counter() - self.t0 < self.budget_s:
            return True
        self.report["skipped"].append({"item": what, "why": "time budget"})
        return False

    def save(self):
        self.report["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        write_json(self.path, self.report)


def guarded(fn) -> dict:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 -- recorded in the report, the run goes on
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}


def capacity_for(model, B: int, P: int, steps: int) -> tuple[int, bool]:
    """The generator's bucket for P + 32 + 256 tokens, or the smallest multiple of 64 holding the checked
    positions where that cache would not fit in free memory (leaving 8 GiB). -> (capacity, reduced)."""
    c = model.config
    bucket = next(s for s in DEFAULT_BUCKETS if s >= P + PROMPT + 256)
    per_slot = 2 * c.n_layer * B * c.n_embd * 2  # keys + values, fp16
    if per_slot * bucket < torch.cuda.mem_get_info()[0] - 8 * 2**30:
        return bucket, False
    return triton.cdiv(P + PROMPT + steps + 1, 64) * 64, True


@torch.inference_mode()
def step_agreement(model, backend, B: int, P: int, steps: int = 3) -> dict:
    c, dev = model.config, DEVICE
    S, reduced = capacity_for(model, B, P, steps)
    gen = torch.Generator(device=dev).manual_seed(B * 1000 + P)
    k = torch.empty(c.n_layer, B, c.n_head, S, c.head_dim, device=dev, dtype=next(model.parameters()).dtype)
    v = torch.empty_like(k)
    for i in range(c.n_layer):  # layer by layer: no full-size fp32 temporary
        k[i].normal_(generator=gen)
        v[i].normal_(generator=gen)
    rows = torch.arange(B, device=dev)
    pos = (P + 1 + (rows * 7) % PROMPT)[:, None]  # ragged prompt lengths 1..32 after the prefix
    ids = torch.randint(0, c.vocab_size, (B, 1), device=dev, generator=gen)
    reference = TorchBackend(model)
    worst = {"max_abs_diff": 0.0, "rel_diff": 0.0, "kv_rel_diff": 0.0}
    equal = 0
    for _ in range(steps):
        got = backend.decode(ids, pos, k, v).float()
        written = torch.stack([k[:, rows, :, pos[:, 0]], v[:, rows, :, pos[:, 0]]]).float()  # Triton's new slots
        want = reference.decode(ids, pos, k, v).float()  # overwrites the same slots: both continue from torch's
        expected = torch.stack([k[:, rows, :, pos[:, 0]], v[:, rows, :, pos[:, 0]]]).float()
        diff = (got - want).abs().max().item()
        scale = want.abs().max().item()
        worst["max_abs_diff"] = max(worst["max_abs_diff"], diff)
        worst["rel_diff"] = max(worst["rel_diff"], diff / scale)
        worst["kv_rel_diff"] = max(worst["kv_rel_diff"],
                                   ((written - expected).abs().max() / expected.abs().max()).item())
        equal += (got.argmax(-1) == want.argmax(-1)).sum().item()
        ids, pos = want.argmax(-1, keepdim=True), pos + 1
    del k, v
    torch.cuda.empty_cache()
    return {"capacity": S, "capacity_reduced_to_fit": reduced, "splits": backend.attention_splits(B, S),
            "logit_scale": round(scale, 4), **{n: float(f"{x:.3g}") for n, x in worst.items()},
            "equal_greedy_tokens": round(equal / (steps * B), 4)}


def check_pdl(run: Run, model) -> bool:
    """One step with PDL equals one without (same kernels otherwise); False where PDL fails or differs."""
    c, dev = model.config, DEVICE
    k = torch.randn(c.n_layer, 8, c.n_head, 512, c.head_dim, device=dev, dtype=next(model.parameters()).dtype)
    ids = torch.randint(0, c.vocab_size, (8, 1), device=dev)
    pos = torch.tensor([[0], [1], [63], [64], [128], [200], [300], [511]], device=dev)

    def compare():
        with torch.inference_mode():
            off = TritonBackend(model, pdl=False).decode(ids, pos, k.clone(), k.clone()).clone()
            on = TritonBackend(model, pdl=True).decode(ids, pos, k.clone(), k.clone())
            torch.cuda.synchronize()
        return {"rel_diff_on_vs_off": (on - off).abs().max().item() / off.abs().max().item()}
    res = guarded(compare)
    run.report["pdl"] = {**res, "capability": list(torch.cuda.get_device_capability())}
    # split-K atomics add in any order, so on and off differ in rounding; a race would differ grossly
    ok = "error" not in res and res["rel_diff_on_vs_off"] <= 1e-2
    run.report["pdl"]["used"] = ok
    print("pdl", json.dumps(run.report["pdl"]), flush=True)
    return ok


def graph_vs_eager(backend, prefix, prompts) -> dict:
    V = backend.model.config.vocab_size
    tok = ByteTokenizer(bos_id=V - 1, eos_id=V - 1, pad_id=V - 1)
    eager, graph = (Generator(backend, tok, max_positions=1024, cuda_graph=g, eos_check_interval=1000).generate(
        prefix, prompts, max_new_tokens=64).tokens for g in (False, True))
    same = eager == graph
    mismatch = (~same).nonzero()
    # split-K atomics add in any order: a near-tie may flip late; a race would diverge at once
    return {"tokens_equal": bool(same.all()), "equal_fraction": round(same.float().mean().item(), 4),
            "first_mismatch": mismatch[0].tolist() if len(mismatch) else None}


def check_graph_replay(run: Run, model, pdl: bool):
    """Graph-replayed greedy tokens equal un-captured ones (the PDL launches inside a captured graph)."""
    backend = TritonBackend(model, pdl=pdl)
    for batch in (1, 8):
        g = torch.Generator().manual_seed(batch)
        prefix = torch.randn(batch, 64, model.config.modality("image").dim, generator=g)
        prompts = [torch.randint(0, model.config.vocab_size - 1, (1 + 5 * b % 32,), generator=g).tolist()
                   for b in range(batch)]
        row = {"batch": batch, "pdl": pdl, **guarded(partial(graph_vs_eager, backend, prefix, prompts))}
        run.report["graph_replay"].append(row)
        print("graph", json.dumps(row), flush=True)


def agreement(run: Run, size: str, model, pdl: bool):
    variants = {"default": TritonBackend(model, pdl=pdl)}
    if size == "124m":  # the unsplit attention and PDL off, where it is cheap
        variants["unsplit"] = TritonBackend(model, pdl=False, attention=UNSPLIT)
        if pdl:
            variants["no-pdl"] = TritonBackend(model, pdl=False)
    for B in BATCHES:
        for P in PREFIXES:
            for name, backend in variants.items():
                if name != "default" and B > 8:
                    continue
                if not run.has_time(f"agreement {size} B={B} P={P} {name}"):
                    return
                row = {"model": size, "batch": B, "prefix_len": P, "variant": name,
                       **guarded(partial(step_agreement, model, backend, B, P))}
                run.report["agreement"].append(row)
                print("agree", json.dumps(row), flush=True)
    run.save()


def time_variant(run: Run, size: str, model, batch: int, prefix_len: int, name: str, backend) -> dict | None:
    if not run.has_time(f"timing {size} B={batch} P={prefix_len} {name}"):
        return None
    res = guarded(partial(bench_mmgpt, backend, batch, PROMPT, NEW_TOKENS, prefix_len, DEVICE, 2))
    kv = kv_bytes_used(model, batch, prefix_len + PROMPT, NEW_TOKENS, torch.float16)
    row = {"model": size, "batch": batch, "prefix_len": prefix_len, "variant": name,
           "bytes_per_step": int(weight_bytes(model) + kv)}
    if "error" in res:
        row["error"] = res["error"]
    else:
        row.update(tokens_per_s=round(res["tokens_per_s"], 1), step_us=round(res["step_ms"] * 1e3, 1),
                   ttft_ms=round(res["ttft_ms"], 2), capacity=res["capacity"])
    run.report["timing"].append(row)
    print("time", json.dumps(row), flush=True)
    return row


def add_multimodal_ratios(rows: list[dict]):
    """Per (model, batch, variant): tok/s at P over tok/s at P=0, the byte-count ideal, and their ratio."""
    text = {(r["model"], r["batch"], r["variant"]): r for r in rows if r["prefix_len"] == 0 and "error" not in r}
    for r in rows:
        base = text.get((r["model"], r["batch"], r["variant"]))
        if r["prefix_len"] and base is not None and "error" not in r:
            ratio = r["tokens_per_s"] / base["tokens_per_s"]
            ideal = base["bytes_per_step"] / r["bytes_per_step"]
            r.update(multimodal_over_text=round(ratio, 3), ideal=round(ideal, 3), of_ideal=round(ratio / ideal, 3))


def timings(run: Run, size: str, model, pdl: bool):
    variants = {"attention-unsplit": TritonBackend(model, pdl=False, attention=UNSPLIT),  # the attention change
                "attention-split": TritonBackend(model, pdl=False)}  # alone, PDL off in both
    if pdl:
        variants["attention-split+pdl"] = TritonBackend(model, pdl=True)
    for batch in ((1, 8) if size == "124m" else (1,)):
        for P in PREFIXES:
            for name, backend in variants.items():
                time_variant(run, size, model, batch, P, name, backend)
    run.save()
    if size != "124m":
        return
    sweep = {"torch-graph": TorchBackend(model), "triton": TritonBackend(model, pdl=pdl)}
    for batch in SWEEP_BATCHES:
        for name, backend in sweep.items():
            time_variant(run, size, model, batch, 64, f"sweep-{name}", backend)
    run.save()


def wide_tiles(run: Run, model, pdl: bool):
    """Alternatives to the default tiles where the batch is large (each compiles its own kernels)."""
    variants = {"tiles-n64": dict(gemv=GemvConfig(gemm_block_n=64)),
                "tiles-n256": dict(gemv=GemvConfig(gemm_block_n=256)),
                "tiles-k128": dict(gemv=GemvConfig(gemm_block_k=128)),
                "tiles-rows128": dict(gemv=GemvConfig(max_block_b=128)),
                "attention-64x4": dict(attention=AttentionConfig(block_s=64, num_warps=4))}
    for name, kw in variants.items():
        backend = TritonBackend(model, pdl=pdl, **kw)
        for batch in (128, 256):
            time_variant(run, "124m", model, batch, 64, f"sweep-{name}", backend)
    run.save()


def print_table(report: dict):
    print(f"\n{report['gpu']}  triton {report['versions']['triton']}  torch {report['versions']['torch']}  "
          f"PDL used: {report['pdl'].get('used')}  {report['elapsed_s']} s")
    print("\nstep agreement (worst over 3 steps)      rel = max|tri - torch| / max|torch logit|")
    for r in report["agreement"]:
        tail = r.get("error") or (f"rel {r['rel_diff']:.2e}  tokens {r['equal_greedy_tokens']:.3f}  "
                                  f"kv {r['kv_rel_diff']:.1e}  S={r['capacity']} splits={r['splits']}")
        print(f"  {r['model']:>5} B={r['batch']:<3} P={r['prefix_len']:<3} {r['variant']:<8} {tail}")
    for r in report["graph_replay"]:
        print(f"  graph replay B={r['batch']} pdl={r['pdl']}: equal {r.get('equal_fraction', r.get('error'))}")
    print("\ntimings (CUDA graph, 32 + 128 tokens)")
    for r in report["timing"]:
        tail = r.get("error") or (f"{r['tokens_per_s']:>10.0f} tok/s {r['step_us']:>8.1f} us/step" + (
            f"  MM/text {r['multimodal_over_text']} (ideal {r['ideal']}, {r['of_ideal']})"
            if "of_ideal" in r else ""))
        print(f"  {r['model']:>5} B={r['batch']:<3} P={r['prefix_len']:<3} {r['variant']:<22} {tail}")
    for s in report["skipped"]:
        print(f"  skipped: {s['item']} ({s['why']})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--budget-s", type=float, default=420.0, help="start no item after this many seconds")
    args = ap.parse_args()
    run = Run(Path(args.out), args.budget_s)
    small = build_model("124m", torch.float16, DEVICE)
    pdl = torch.cuda.get_device_capability()[0] >= 9 and check_pdl(run, small)
    check_graph_replay(run, small, pdl)
    agreement(run, "124m", small, pdl)
    timings(run, "124m", small, pdl)
    large = build_model("1p5b", torch.float16, DEVICE)
    timings(run, "1p5b", large, pdl)
    agreement(run, "1p5b", large, pdl)
    del large
    torch.cuda.empty_cache()
    wide_tiles(run, small, pdl)
    add_multimodal_ratios(run.report["timing"])
    run.save()
    print_table(run.report)
    print(f"wrote {run.path}")


if __name__ == "__main__":
    main()
