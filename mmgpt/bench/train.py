"""Training-step benchmark: mmgpt eager, compiled and CUDA-graph-replayed beside Hugging Face GPT2LMHeadModel eager
and compiled, same weights, same shapes, one run.

python -m mmgpt.bench train [--shapes 124m-text 124m-digits 1p5b-p576] [--impls ...] [--steps 20] [--smoke]

A step is what train.py runs per batch, without Lightning around it: the module's own loss (MultimodalGPTModule's
step_loss, compiled and CUDA-graph replayed by its compile_step as module.compile / module.cuda_graph say) under
bf16 autocast (fp32 weights), backward, gradient clipping at trainer.gradient_clip_val, the module's optimizer
(conf/train.yaml's, over parameter_groups(), fused where train.py fuses it) and its learning-rate schedule, zero_grad.
Hugging Face rows get the same optimizer settings, clipping and autocast, eager, compiled and CUDA-graph replayed
(compile's reduce-overhead mode), so each mmgpt variant has its like. Each row reports tok/s (sequence positions,
prefix included), MFU (nanoGPT's 6N + 12 L H Dh T FLOPs per token against the GPU's dense bf16 peak), step time
(CUDA events around --steps steps after --warmup steps), the first step's time (compilation shows there) and peak
memory. Hugging Face gets the prefix as `inputs_embeds` from the same prefix encoder. `--smoke` runs a tiny CPU
configuration that only checks the report is well formed (speed is never asserted anywhere).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import importlib
import importlib.util
import inspect
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from mmgpt.bench.decode import PATCH_DIM, SHAPES as MODEL_SHAPES, _guard, merge_reports, to_hf_gpt2, versions, \
    write_report
from mmgpt.contract.typed import conf_defaults
from mmgpt.model import GPTConfig, image_to_text
from mmgpt.throughput import device_name, flops_per_token, matmul_params, mfu, peak_flops_for
from mmgpt.tokenizer import ByteTokenizer
from mmgpt.training.module import ModuleConfig, MultimodalGPTModule


@dataclass(frozen=True)
class Shape:
    size: str  # a GPT-2 shape of mmgpt.bench.decode.SHAPES
    batch: int
    prefix_len: int
    text_len: int
    vocab: int
    activation_checkpointing: bool = False


SHAPES = {
    "124m-text": Shape("124m", batch=16, prefix_len=0, text_len=1024, vocab=50257),
    "124m-digits": Shape("124m", batch=64, prefix_len=64, text_len=24, vocab=259),  # the byte tokenizer's vocabulary
    "1p5b-p576": Shape("1p5b", batch=8, prefix_len=576, text_len=64, vocab=50257, activation_checkpointing=True),
    "smoke": Shape("smoke", batch=2, prefix_len=4, text_len=8, vocab=512),
}
MMGPT_IMPLS = {  # module.compile, module.cuda_graph: what train.py's conf/train.yaml switches
    "mmgpt-eager": (False, False),
    "mmgpt-compile": (True, False),
    "mmgpt-graph": (True, True),
}
HF_IMPLS = {"hf-eager": None, "hf-compile": {"mode": "default", "dynamic": False},  # torch.compile's arguments
            "hf-graph": {"mode": "reduce-overhead", "dynamic": False}}
IMPLS = [*MMGPT_IMPLS, *HF_IMPLS]
ATTENTION = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def make_batch(shape: Shape, prefix_dim: int, device, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randn(shape.batch, shape.prefix_len, prefix_dim, generator=g)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.text_len + 1), generator=g)
    return prefix.to(device), ids[:, :-1].contiguous().to(device), ids[:, 1:].contiguous().to(device)


def optimizer_factory():
    """conf/train.yaml's optimizer, as train.py instantiates it (without Hydra)."""
    node = conf_defaults("train.yaml", "optimizer")
    module, name = node["_target_"].rsplit(".", 1)
    kwargs = {k: v for k, v in node.items() if not k.startswith("_")}
    return functools.partial(getattr(importlib.import_module(module), name), **kwargs)


def build_module(shape: Shape, device) -> MultimodalGPTModule:
    """The LightningModule train.py trains, at a benchmark shape: conf/train.yaml's module options and optimizer."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=shape.vocab, block_size=1024, **image_to_text(PATCH_DIM), **MODEL_SHAPES[shape.size])
    tokenizer = ByteTokenizer(bos_id=256, eos_id=257, pad_id=258)
    options = ModuleConfig.defaults(activation_checkpointing=shape.activation_checkpointing)
    return MultimodalGPTModule(config.to_dict(), tokenizer.to_dict(), options, optimizer=optimizer_factory()).to(device)


def hf_loss(hf, prefix_encoder):
    """The same loss through GPT2LMHeadModel: prefix embeddings + token embeddings as `inputs_embeds`, and only the
    text positions through the head where transformers can keep just those (`logits_to_keep`)."""
    keep = "logits_to_keep" in inspect.signature(hf.forward).parameters

    def loss(prefix, input_ids, targets):
        P = prefix.shape[1]
        labels = input_ids  # transformers shifts labels itself
        if P == 0:
            return hf(input_ids=input_ids, labels=labels, use_cache=False).loss
        embeds = torch.cat([prefix_encoder(prefix).to(hf.transformer.wte.weight.dtype),
                            hf.transformer.wte(input_ids)], dim=1)
        if keep:
            return hf(inputs_embeds=embeds, labels=labels, logits_to_keep=input_ids.shape[1], use_cache=False).loss
        labels = torch.cat([torch.full_like(labels[:, :1], -100).expand(-1, P), labels], dim=1)
        return hf(inputs_embeds=embeds, labels=labels, use_cache=False).loss
    return loss


def training_step(step_loss, params: list, optimizer, scheduler, device):
    """One optimizer step as Lightning runs train.py's: the loss under autocast, backward, clipping at
    trainer.gradient_clip_val, the optimizer and its schedule, zero_grad."""
    cuda = device.type == "cuda"
    clip = conf_defaults("trainer/default.yaml")["gradient_clip_val"]

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = step_loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    return step


def time_training(step, device, warmup: int, steps: int) -> dict:
    """Run warmup + steps training steps; time the last `steps` with CUDA events (wall clock on a CPU)."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t = time.perf_counter()
    loss = step()
    sync()
    first_s = time.perf_counter() - t
    for _ in range(warmup - 1):
        step()
    sync()
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            loss = step()
        end.record()
        sync()
        seconds = start.elapsed_time(end) / 1e3
    else:
        t = time.perf_counter()
        for _ in range(steps):
            loss = step()
        seconds = time.perf_counter() - t
    return {"step_ms": 1e3 * seconds / steps, "first_step_s": first_s, "loss": float(loss.detach())}


def _free(device):
    torch._dynamo.reset()  # compiled graphs and CUDA-graph pools hold memory and the model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def with_attention(fn, args):
    if args.attention == "auto":
        return fn()
    with sdpa_kernel([ATTENTION[args.attention]]):  # compilation happens inside, so it picks this kernel too
        return fn()


def mmgpt_step(module: MultimodalGPTModule, impl: str, batch: dict, device, total_steps: int):
    """The module's training step for one variant: compiled as its options say, with its optimizer and schedule."""
    compile, cuda_graph = MMGPT_IMPLS[impl]
    module.config = dataclasses.replace(module.config, compile=compile, cuda_graph=cuda_graph)
    module.compile_step(device)
    optimizer, scheduler = module.make_optimizer(total_steps, device)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return training_step(lambda: module.step_loss(batch), params, optimizer, scheduler, device)


def run_mmgpt(module: MultimodalGPTModule, impl: str, batch: dict, device, args) -> dict:
    """One mmgpt row, in full training steps."""
    _free(device)
    step = mmgpt_step(module, impl, batch, device, args.warmup + args.steps)
    return with_attention(lambda: time_training(step, device, args.warmup, args.steps), args)


def run_hf(hf, prefix_encoder, impl: str, batch: dict, device, args) -> dict:
    """One Hugging Face row: the same optimizer settings (fused where the module's would be), clipping and
    autocast; the loss eager, compiled, or compiled and CUDA-graph replayed."""
    _free(device)
    options = HF_IMPLS[impl]
    loss = hf_loss(hf, prefix_encoder)
    fn = loss if options is None else torch.compile(loss, **options)
    graph = options is not None and options["mode"] == "reduce-overhead"

    def step_loss():
        if graph:  # as the module does: this replay may overwrite the previous step's graph outputs
            torch.compiler.cudagraph_mark_step_begin()
        return fn(batch["context"]["image"], batch["input_ids"], batch["targets"])
    params = [*hf.parameters(), *prefix_encoder.parameters()]
    factory = optimizer_factory()
    optimizer = factory(params, **({"fused": True} if device.type == "cuda" else {}))
    step = training_step(step_loss, params, optimizer, None, device)
    return with_attention(lambda: time_training(step, device, args.warmup, args.steps), args)


def bench_shape(name: str, shape: Shape, impls: list[str], device, peak, args) -> list[dict]:
    module = build_module(shape, device).train()
    model = module.model
    c = model.config
    seq = shape.prefix_len + shape.text_len
    n = matmul_params(model)
    fpt = flops_per_token(n, c.n_layer, c.n_head, c.head_dim, seq)
    prefix, input_ids, targets = make_batch(shape, PATCH_DIM, device)
    batch = {"context": {"image": prefix}, "input_ids": input_ids, "targets": targets}
    rows = []

    def record(impl, res):
        row = {"model": name, "dtype": "bf16-mixed" if device.type == "cuda" else "fp32", "batch": shape.batch,
               "impl": impl, "prefix_len": shape.prefix_len, "text_len": shape.text_len, "vocab": shape.vocab,
               "params": n, "flops_per_token": fpt, "activation_checkpointing": shape.activation_checkpointing}
        if "error" in res:
            rows.append({**row, "error": res["error"]})
            print(f"{name:<12} {impl:<14} FAILED: {res['error']}", flush=True)
            return
        tok_s = shape.batch * seq / (res["step_ms"] / 1e3)
        achieved = mfu(tok_s, fpt, peak)
        row.update(tokens_per_s=round(tok_s, 1), mfu=None if achieved is None else round(achieved, 4),
                   step_ms=round(res["step_ms"], 3), first_step_s=round(res["first_step_s"], 2),
                   loss=round(res["loss"], 4))
        if device.type == "cuda":
            row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        rows.append(row)
        mfu_text = f"{100 * achieved:5.1f}%" if achieved is not None else "  n/a"
        print(f"{name:<12} {impl:<14} {tok_s:>11,.0f} tok/s  MFU {mfu_text}  {row['step_ms']:8.2f} ms/step  "
              f"peak {row.get('peak_mem_gib', float('nan')):6.2f} GiB  first step {row['first_step_s']:.1f} s",
              flush=True)

    for impl in (i for i in impls if i in MMGPT_IMPLS):
        record(impl, _guard(lambda: run_mmgpt(module, impl, batch, device, args)))
        model.zero_grad(set_to_none=True)
    hf_impls = [i for i in impls if i in HF_IMPLS] if args.hf else []
    if hf_impls:
        prefix_encoder = model.encoders["image"]
        hf = to_hf_gpt2(model).train()
        del model, module  # one model's weights on the device at a time
        if shape.activation_checkpointing:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for impl in hf_impls:
            record(impl, _guard(lambda: run_hf(hf, prefix_encoder, impl, batch, device, args)))
            hf.zero_grad(set_to_none=True)
    return rows


def compare_with_hf(rows: list[dict]) -> None:
    """Each mmgpt row's speed over its Hugging Face like on the same shape (compiled over compiled, CUDA graphs over
    CUDA graphs, eager over eager), where both ran."""
    hf = {(r["model"], r["impl"]): r["tokens_per_s"] for r in rows if r["impl"].startswith("hf-") and "error" not in r}
    for r in rows:
        like = (r["model"], "hf-" + r["impl"].removeprefix("mmgpt-"))
        if r["impl"].startswith("mmgpt") and "error" not in r and like in hf:
            r["over_hf_like"] = round(r["tokens_per_s"] / hf[like], 3)  # 3 places: a ratio near 0.4 still within 1%


def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    gpu = device_name(device)
    peak = args.peak_flops or peak_flops_for(gpu)
    report = {"date": datetime.date.today().isoformat(), "gpu": gpu, "device": str(device),
              "tag": "-".join(t for t in ("train", args.tag) if t), "versions": versions(device), "peak_flops": peak,
              "settings": {"warmup": args.warmup, "steps": args.steps, "attention": args.attention,
                           "precision": "bf16 autocast, fp32 weights" if device.type == "cuda" else "fp32",
                           "optimizer": f"conf/train.yaml's {conf_defaults('train.yaml', 'optimizer')}, fused on a "
                                        "GPU; clipping at trainer.gradient_clip_val "
                                        f"{conf_defaults('trainer/default.yaml')['gradient_clip_val']}",
                           "shapes": {s: asdict(SHAPES[s]) for s in args.shapes}},
              "rows": []}
    for name in args.shapes:
        report["rows"] += bench_shape(name, SHAPES[name], args.impls, device, peak, args)
        _free(device)  # the shape's models are gone now; so are their compiled graphs
        compare_with_hf(report["rows"])
        write_report(report, Path(args.out), table=markdown_table)  # keep what was measured if a later shape fails
    return report


def markdown_table(report: dict) -> str:
    peak = f"{report['peak_flops'] / 1e12:.0f} TFLOP/s peak" if report.get("peak_flops") else "no peak FLOP/s known"
    s = report["settings"]
    lines = [f"{report['gpu']}, {report['date']}, {s['precision']}, {s['optimizer']}; {s['steps']} timed steps "
             f"after {s['warmup']}; attention {s['attention']}; MFU against {peak}",
             "",
             "| shape | impl | batch | prefix + text | tok/s | MFU | step ms | peak GiB | first step s "
             "| vs HF like |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        head = f"| {r['model']} | {r['impl']} | {r['batch']} | {r['prefix_len']} + {r['text_len']} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error'][:80]} | | | | | |")
            continue
        achieved = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        lines.append(f"{head} {r['tokens_per_s']:,.0f} | {achieved} | {r['step_ms']:.2f} | {r.get('peak_mem_gib', '')} "
                     f"| {r['first_step_s']} | {r.get('over_hf_like', '')} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m mmgpt.bench train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["124m-text", "124m-digits", "1p5b-p576"],
                    choices=[s for s in SHAPES if s != "smoke"])
    ap.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first: compilation, CUDA-graph recording")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--attention", default="auto", choices=["auto", *ATTENTION],
                    help="restrict scaled_dot_product_attention to one kernel (auto: PyTorch's choice)")
    ap.add_argument("--peak-flops", type=float, default=None, help="per-GPU FLOP/s for MFU (default: from the name)")
    ap.add_argument("--no-hf", dest="hf", action="store_false")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run that checks the report's form")
    ap.add_argument("--merge", nargs="+", default=None, help="merge these result files into one report, run nothing")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default="", help="suffix of the result file name, after 'train'")
    args = ap.parse_args(argv)
    if args.merge:
        report = {**merge_reports([Path(p) for p in args.merge]), "tag": "-".join(t for t in ("train", args.tag) if t)}
        compare_with_hf(report["rows"])
        print(f"wrote {write_report(report, Path(args.out), table=markdown_table)}")
        return report
    if args.smoke:
        args.shapes, args.impls, args.warmup, args.steps = ["smoke"], ["mmgpt-eager", "hf-eager"], 1, 2
    if args.hf and importlib.util.find_spec("transformers") is None:
        print("transformers is not installed: Hugging Face rows skipped (pip install -e .[bench])")
        args.hf = False
    report = run(args)
    print(markdown_table(report))
    print(f"wrote {write_report(report, Path(args.out), table=markdown_table)}")
    return report


if __name__ == "__main__":
    main()
