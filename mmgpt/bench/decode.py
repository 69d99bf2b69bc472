"""Decode-speed benchmark: mmgpt's decode loop against Hugging Face transformers, same weights, same GPU, one run.

python -m mmgpt.bench [decode] [--models 124m 355m 1p5b] [--dtypes fp16 bf16] [--batches 1 8] [--prefixes 0 64]
                              [--decoded text codes] [--skip IMPL ...] [--smoke]

Models: GPT-2 shapes (124m, 355m, 1p5b), and Llama-family shapes read from conf/model/ (smollm2_135m,
qwen2p5_0p5b, llama3p2_1b) with their own vocabularies. Rows: mmgpt torch backend in a CUDA graph, with and without
torch.compile, with the fused Triton kernels, and with the persistent decode kernel (GPT-2 fp16 on Hopper, batch
<= 8), at every batch x image-prefix length; Hugging Face's own
class for the family (GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM) on the same weights, eager and with a
static cache + torch.compile, text only.
Each row reports tok/s, time to first token, GB/s and % of the memory-bandwidth floor (copy bandwidth measured in
the same run), and peak memory. Rows with an image prefix carry the multimodal / text-only ratio of the same decode
loop, the ratio the byte count allows (weights + mean KV bytes per step without the prefix, over the same with
it) and the first over the second; every row carries its tok/s over mmgpt's torch graph at the same shape.
`--decoded text codes` also decodes a new discrete modality (`codes`: its own embedding table and head over
`--new-vocab` ids, the image as the context) with the same model otherwise, and gives each such row its tok/s over
decoding text at the same batch, context and impl (the seed's question: is the new modality as fast as text?).
`--smoke` runs a tiny CPU configuration that only checks the report is well formed (speed is never asserted).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import platform
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from mmgpt.bench.results import write_result
from mmgpt.hf import hf_config
from mmgpt.model import MODALITY_TABLES, GPTConfig, Modality, MultimodalGPT, image_to_text
from mmgpt.runtime.backends.torch_model import TorchBackend
from mmgpt.runtime.generator import Generator
from mmgpt.tokenizer import ByteTokenizer
from mmgpt.errors import UserError

SHAPES = {  # GPT-2 shapes; vocab 50257 like GPT-2 so the head costs what it costs there
    "124m": dict(n_layer=12, n_head=12, n_embd=768),
    "355m": dict(n_layer=24, n_head=16, n_embd=1024),
    "1p5b": dict(n_layer=48, n_head=25, n_embd=1600),
    "smoke": dict(n_layer=2, n_head=2, n_embd=64),
}
# Llama-family shapes: conf/model/<name>.yaml, the file training uses, with the model's own vocabulary
CONF_MODELS = Path(__file__).resolve().parents[2] / "conf" / "model"
LLAMA_SHAPES = ("smollm2_135m", "qwen2p5_0p5b", "llama3p2_1b", "tiny_llama")
IMPLS = ("mmgpt-graph", "mmgpt-graph+compile", "mmgpt-graph+triton", "mmgpt-graph+persistent", "hf-eager",
         "hf-static+compile")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PREFIXES = (0, 64)  # text only, and an 8x8 grid of patches (LLaVA-1.5's 24x24 grid is 576)
PATCH_DIM = 48  # a 4x4 RGB patch
GRAPH_IMPL = "mmgpt-graph"  # the row the others are compared with
WARMUP = 3  # untimed calls of every variant before it is timed: one compiles and captures, the rest settle
CHECK_TOKENS = 16  # greedy tokens compared between mmgpt and Hugging Face on the timed weights
NEW_VOCAB = 8192  # the new modality's vocabulary: a VQ image codebook's size


def shape_fields(size: str, vocab: int) -> dict:
    """GPTConfig fields of a benchmark shape: GPT-2's at `vocab`, a Llama family's from its conf/model/ file."""
    if size in SHAPES:
        return dict(vocab_size=vocab, **SHAPES[size])
    from omegaconf import OmegaConf
    fields = OmegaConf.to_container(OmegaConf.load(CONF_MODELS / f"{size}.yaml"))
    fields.setdefault("vocab_size", vocab)
    return {k: v for k, v in fields.items() if k not in ("block_size", "modalities", "context", "decoded")}


def build_model(size: str, dtype, device, vocab: int = 50257, block: int = 1024, decoded: str = "text",
                new_vocab: int = NEW_VOCAB) -> MultimodalGPT:
    """The image as the context; decoding text, or a new modality `codes` with its own tables."""
    torch.manual_seed(0)
    roles = image_to_text(PATCH_DIM)
    if decoded != "text":
        roles["modalities"].append(Modality(decoded, "discrete", vocab_size=new_vocab, end_id=new_vocab - 1,
                                            head=True))
        roles["decoded"] = decoded
    cfg = GPTConfig(**{**shape_fields(size, vocab), "block_size": block, **roles})
    return MultimodalGPT(cfg).to(device=device, dtype=dtype).eval()


def weight_bytes(model: MultimodalGPT) -> int:
    """Bytes one decode step must read: every parameter once, except tables read one row per token (GPT-2's
    positions; the token table where it is not also the head)."""
    def size(p):
        return p.numel() * p.element_size()
    total = sum(size(p) for p in model.parameters())
    if model.config.family == "gpt2":
        total -= size(model.transformer.wpe.weight)
    if not model.config.tie_weights:
        total -= size(model.token_embedding.weight)
    return total


def kv_bytes_used(model: MultimodalGPT, batch: int, start: int, steps: int, dtype) -> float:
    """Mean KV bytes a step must read: keys and values (n_kv_head heads) of the positions filled so far."""
    c = model.config
    mean_len = start + (steps - 1) / 2
    return 2 * c.n_layer * batch * c.n_kv_head * c.head_dim * mean_len * torch.tensor([], dtype=dtype).element_size()


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


def to_hf(model: MultimodalGPT):
    """The same weights in Hugging Face's own class for the model's family."""
    return to_hf_gpt2(model) if model.config.family == "gpt2" else to_hf_llama(model)


def to_hf_llama(model: MultimodalGPT):
    """The same weights as LlamaForCausalLM / Qwen2ForCausalLM, built from the config hf/ would carry: the names are
    the same on both sides."""
    import transformers
    V = model.config.vocab_size
    p = next(model.parameters())
    fields = hf_config(model.config, ByteTokenizer(bos_id=V - 1, eos_id=V - 1, pad_id=V - 1), p.dtype)
    hf_cfg = transformers.CONFIG_MAPPING[fields.pop("model_type")](**fields)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).to(device=p.device, dtype=p.dtype).eval()
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith(MODALITY_TABLES)}
    missing, unexpected = hf.load_state_dict(ours, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_weights)]
    if missing or unexpected:  # a benchmark of other weights than mmgpt's would compare nothing
        raise RuntimeError(f"to_hf_llama: mmgpt weights with no {type(hf).__name__} place {unexpected[:5]}, its "
                           f"weights left unset {missing[:5]}")
    return hf


def to_hf_gpt2(model: MultimodalGPT):
    """The same weights as transformers' GPT2LMHeadModel (its Conv1D stores weights transposed)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    c = model.config
    hf_cfg = GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                        n_head=c.n_head, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, tie_word_embeddings=True)
    p = next(model.parameters())
    hf = GPT2LMHeadModel(hf_cfg).to(device=p.device, dtype=p.dtype).eval()
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith(MODALITY_TABLES)}
    theirs = hf.state_dict()
    unmapped = sorted(set(ours) - set(theirs))
    unset = sorted(k for k in set(theirs) - set(ours) if not k.endswith(".attn.bias")  # causal-mask buffers
                   and not (k == "lm_head.weight" and hf_cfg.tie_word_embeddings))
    if unmapped or unset:  # a benchmark of other weights than mmgpt's would compare nothing
        raise RuntimeError(f"to_hf_gpt2: mmgpt weights with no GPT2LMHeadModel place {unmapped[:5]}, GPT2LMHeadModel "
                           f"weights left unset {unset[:5]}")
    with torch.no_grad():
        for k, v in ours.items():
            transpose = k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) and ".h." in k
            if theirs[k].shape != (v.t() if transpose else v).shape:
                raise RuntimeError(f"to_hf_gpt2: {k} is {tuple(v.shape)} in mmgpt, {tuple(theirs[k].shape)} in HF")
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


def bench_mmgpt(be: TorchBackend, batch, prompt_len, new_tokens, prefix_len, device, repeats, warmup=WARMUP):
    model = be.model
    V = be.dims.vocab_size  # the decoded modality's
    gen = Generator(be, ByteTokenizer(bos_id=V - 1, eos_id=V - 1, pad_id=V - 1),
                    max_positions=model.config.block_size, eos_check_interval=new_tokens + 1)  # EOS never stops it
    g = torch.Generator().manual_seed(1)
    prefix = torch.randn(batch, prefix_len, PATCH_DIM, generator=g).to(device)
    prompts = torch.randint(0, V - 1, (batch, prompt_len), generator=g).tolist()
    for _ in range(warmup):  # compile, capture, allocate, and let clocks and caches settle
        gen.generate(prefix, prompts, max_new_tokens=new_tokens)
    runs = [gen.generate(prefix, prompts, max_new_tokens=new_tokens) for _ in range(repeats)]
    best = min(runs, key=lambda r: r.decode_time_s)
    return {"tokens_per_s": best.decode_tokens_per_s, "ttft_ms": 1e3 * min(r.time_to_first_token_s for r in runs),
            "step_ms": 1e3 * best.decode_time_s / best.decode_steps, "capacity": best.capacity,
            "graph_captures": gen.graph_captures, "cuda_graph": best.cuda_graph,
            "pdl": getattr(be, "pdl", False)}  # only the Triton backend launches with PDL


def hf_agrees(model: MultimodalGPT, hf, device, prompt_len: int) -> dict:
    """Greedy tokens of mmgpt (un-captured torch backend) and of the Hugging Face model built from its weights, on
    the same text prompts: the two rows time the same model only if they generate the same tokens."""
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, V - 1, (2, prompt_len), generator=g)
    gen = Generator(TorchBackend(model), ByteTokenizer(bos_id=V - 1, eos_id=V - 1, pad_id=V - 1),
                    max_positions=model.config.block_size, cuda_graph=False, eos_check_interval=CHECK_TOKENS + 1)
    ours = gen.generate(torch.zeros(2, 0, PATCH_DIM, device=device), ids.tolist(),
                        max_new_tokens=CHECK_TOKENS).tokens[:, :CHECK_TOKENS]
    with torch.inference_mode():
        theirs = hf.generate(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                             max_new_tokens=CHECK_TOKENS, min_new_tokens=CHECK_TOKENS, do_sample=False,
                             pad_token_id=V - 1, eos_token_id=None)[:, prompt_len:].cpu()
    same = ours == theirs
    return {"tokens_match": bool(same.all()), "first_difference": None if same.all() else
            int((~same).any(0).int().argmax())}


def bench_hf(hf, batch, prompt_len, new_tokens, static_compile, device, repeats, warmup=WARMUP):
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
        for _ in range(warmup):  # compilation and graph capture for prefill and decode (the static cache's
            run(1)  # length follows max_new_tokens, so the timed shape itself is warmed up)
            run(new_tokens)
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


@dataclass
class Setup:
    """What every row of one model / dtype shares."""
    size: str
    dtype_name: str
    model: MultimodalGPT
    weight_bytes: int
    bandwidth: float  # copy bandwidth, bytes/s (NaN on a CPU)
    device: torch.device
    prompt_len: int
    new_tokens: int


def measure_row(setup: Setup, impl: str, batch: int, prefix_len: int, bench) -> dict:
    """Runs one benchmark (a bench_* call) and makes its row: tok/s, TTFT, bytes per step, % of floor, peak memory."""
    _reset_peak(setup.device)
    res = _guard(bench)
    decoded = setup.model.config.decoded
    row = {"model": setup.size, "dtype": setup.dtype_name, "batch": batch, "impl": impl, "prefix_len": prefix_len,
           "decoded": decoded}
    label = f"{setup.size:>5} {setup.dtype_name} B={batch:<3} {impl:<24} P={prefix_len:<3} {decoded:<5}"
    if "error" in res:
        print(f"{label} FAILED: {res['error']}", flush=True)
        return {**row, "error": res["error"]}
    kv = kv_bytes_used(setup.model, batch, prefix_len + setup.prompt_len, setup.new_tokens, DTYPES[setup.dtype_name])
    step_s = res["step_ms"] / 1e3
    row.update({"prompt_len": setup.prompt_len, "new_tokens": setup.new_tokens,
                "tokens_per_s": round(res["tokens_per_s"], 1), "ttft_ms": round(res["ttft_ms"], 3),
                "step_us": round(step_s * 1e6, 2), "weight_bytes": setup.weight_bytes, "kv_bytes_per_step": int(kv),
                "gb_per_s": round((setup.weight_bytes + kv) / step_s / 1e9, 1)})
    if setup.bandwidth == setup.bandwidth:  # measured (not NaN)
        row["pct_of_floor"] = round(100 * (setup.weight_bytes + kv) / setup.bandwidth / step_s, 1)
    if setup.device.type == "cuda":
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(setup.device) / 2**30, 3)
    row.update({k: res[k] for k in ("capacity", "graph_captures", "cuda_graph", "pdl") if k in res})
    print(f"{label} {row['tokens_per_s']:>10.1f} tok/s  ttft {row['ttft_ms']:8.2f} ms  "
          f"{row.get('pct_of_floor', float('nan')):5.1f}% floor", flush=True)
    return row


def pair_rows(rows: list[dict]) -> list[dict]:
    """Adds to each measured row what its partner rows say, looked up by key (model, dtype, batch, impl, prefix,
    decoded modality): with a prefix, the multimodal / text-only tok/s ratio against the same impl at prefix 0, the
    ratio the byte count allows, and the first over the second; tok/s over mmgpt's torch graph at the same shape;
    decoding a new modality, tok/s over decoding text at the same shape."""
    def key(r, impl=None, prefix_len=None, decoded=None):
        return (r["model"], r["dtype"], r["batch"], impl or r["impl"],
                r["prefix_len"] if prefix_len is None else prefix_len, decoded or r.get("decoded", "text"))
    measured = {key(r): r for r in rows if "error" not in r}
    for r in measured.values():
        text = measured.get(key(r, prefix_len=0))
        if r["prefix_len"] and text is not None:
            ratio = r["tokens_per_s"] / text["tokens_per_s"]
            ideal = ((text["weight_bytes"] + text["kv_bytes_per_step"])
                     / (r["weight_bytes"] + r["kv_bytes_per_step"]))  # tok/s scales as 1 / bytes per step
            r.update(multimodal_over_text=round(ratio, 3), ideal_multimodal_over_text=round(ideal, 3),
                     multimodal_of_ideal=round(ratio / ideal, 3))
        graph = measured.get(key(r, impl=GRAPH_IMPL))
        if graph is not None and graph is not r:
            r["over_mmgpt_graph"] = round(r["tokens_per_s"] / graph["tokens_per_s"], 3)
        text = measured.get(key(r, decoded="text"))
        if r.get("decoded", "text") != "text" and text is not None:
            r["new_over_text"] = round(r["tokens_per_s"] / text["tokens_per_s"], 3)
    return rows


def _backends(model: MultimodalGPT, device, args) -> dict:
    """One backend per variant, shared by every batch and prefix: compiled code is reused where shapes match."""
    if device.type != "cuda":
        return {"mmgpt-eager-cpu": TorchBackend(model)}
    backends = {GRAPH_IMPL: TorchBackend(model)}
    if args.compile:
        backends["mmgpt-graph+compile"] = TorchBackend(model, compile=True)
    if args.triton:
        from mmgpt.runtime.backends.fused_triton import TritonBackend
        backends["mmgpt-graph+triton"] = TritonBackend(model, pdl=args.pdl)
    if "mmgpt-graph+persistent" not in args.skip:  # built only where asked for: it compiles CUDA at first use
        from mmgpt.runtime.backends.persistent import PersistentBackend
        try:
            backends["mmgpt-graph+persistent"] = PersistentBackend(model)
        except UserError as e:  # another family, dtype or GPU: the row is left out, and says why
            print(f"mmgpt-graph+persistent skipped: {e}", flush=True)
    return {name: be for name, be in backends.items() if name not in args.skip}


def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    bw = copy_bandwidth(device)
    rows = []
    for size, dname, decoded in ((s, d, m) for s in args.models for d in args.dtypes for m in args.decoded):
        model = build_model(size, DTYPES[dname], device, vocab=args.vocab, decoded=decoded,
                            new_vocab=args.new_vocab)
        setup = Setup(size, dname, model, weight_bytes(model), bw, device, args.prompt, args.new_tokens)
        hf = to_hf(model) if args.hf and decoded == "text" else None
        agreement = hf_agrees(model, hf, device, args.prompt) if hf is not None else None
        if agreement is not None:
            verdict = "equal" if agreement["tokens_match"] else "DIFFER from"
            print(f"{size} {dname}: Hugging Face greedy tokens {verdict} mmgpt's over {CHECK_TOKENS} steps",
                  flush=True)
        backends = _backends(model, device, args)
        for batch in args.batches:
            for name, backend in backends.items():
                for prefix_len in args.prefixes:
                    rows.append(measure_row(setup, name, batch, prefix_len, partial(
                        bench_mmgpt, backend, batch, args.prompt, args.new_tokens, prefix_len, device,
                        args.repeats, args.warmup)))
            if hf is not None:  # text only: the HF model has no prefix encoder
                hf_variants = {"hf-eager": False}
                if device.type == "cuda" and args.compile:
                    hf_variants["hf-static+compile"] = True
                for name, static_compile in hf_variants.items():
                    if name in args.skip:
                        continue
                    rows.append({**measure_row(setup, name, batch, 0, partial(
                        bench_hf, hf, batch, args.prompt, args.new_tokens, static_compile, device, args.repeats,
                        args.warmup)),
                        "hf_greedy_equals_mmgpt": agreement})
            if args.partial_out:  # keep what was measured if a later row takes the machine down
                write_report(_report(args, device, gpu, bw, pair_rows(rows)), Path(args.partial_out))
        del model, hf, backends, setup
        torch._dynamo.reset()  # compiled graphs hold the model: free them before the next size
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return _report(args, device, gpu, bw, pair_rows(rows))


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
                         "prefixes": args.prefixes, "repeats": args.repeats, "vocab": args.vocab,
                         "decoded": args.decoded, "new_vocab": args.new_vocab,
                         "warmup_calls": args.warmup},
            "rows": rows}


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def markdown_table(report: dict) -> str:
    head = ("| model | dtype | batch | P | impl | decoded | tok/s | TTFT ms | GB/s | % floor | peak GiB | MM/text | "
            "ideal | of ideal | x graph | new/text |\n|---|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"
            "---:|---:|---:|")
    legend = (f"{report['gpu']}, {report['date']}, copy bandwidth {report['copy_bandwidth_gb_s']} GB/s, "
              f"prompt {report['settings']['prompt_len']} + {report['settings']['new_tokens']} new tokens, greedy. "
              "P: image-prefix length; MM/text: tok/s over the same impl's at P=0; ideal: that ratio from the bytes "
              "read per step; x graph: tok/s over mmgpt-graph's at the same shape; new/text: a new decoded modality's "
              "tok/s over decoding text at the same shape")
    lines = [legend, "", head]
    for r in report["rows"]:
        first = (f"| {r['model']} | {r['dtype']} | {r['batch']} | {r.get('prefix_len', 0)} | {r['impl']} | "
                 f"{r.get('decoded', 'text')} |")
        if "error" in r:
            lines.append(f"{first} failed: {r['error'][:80]} | | | | | | | | | |")
            continue
        lines.append(f"{first} {r['tokens_per_s']:.0f} | {r['ttft_ms']:.2f} | {r['gb_per_s']:.0f} | "
                     f"{r.get('pct_of_floor', '')} | {r.get('peak_mem_gib', '')} | "
                     f"{r.get('multimodal_over_text', '')} | {r.get('ideal_multimodal_over_text', '')} | "
                     f"{r.get('multimodal_of_ideal', '')} | {r.get('over_mmgpt_graph', '')} | "
                     f"{r.get('new_over_text', '')} |")
    return "\n".join(lines)


def write_report(report: dict, out_dir: Path, table=markdown_table) -> Path:
    return write_result(out_dir, report, report.get("tag", ""), table(report))


def merge_reports(paths: list[Path]) -> dict:
    """Several runs on one GPU (one process per model size fits the device's time limit) -> one report.
    Rows keep their source file; a later file's row replaces an earlier one with the same key."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    gpus = {r["gpu"] for r in reports}
    if len(gpus) != 1:
        raise UserError(f"refusing to merge reports from different GPUs: {sorted(gpus)}")
    rows: dict[tuple, dict] = {}
    for path, report in zip(paths, reports):
        for row in report["rows"]:
            key = (row["model"], row["dtype"], row["batch"], row["impl"], row.get("prefix_len", 0),
                   row.get("decoded", "text"))
            rows[key] = {**row, "source": Path(path).name}
    base = reports[-1]
    merged = {**base, "tag": "", "merged_from": [Path(p).name for p in paths], "rows": list(rows.values())}
    if "copy_bandwidth_gb_s" in base:  # decode reports: each run measured its own, and pairs image/text rows
        merged["copy_bandwidth_gb_s_per_run"] = {Path(p).name: r["copy_bandwidth_gb_s"] for p, r in zip(paths, reports)}
        merged["rows"] = pair_rows(merged["rows"])
    return merged


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["124m", "355m", "1p5b"], choices=[*SHAPES, *LLAMA_SHAPES])
    ap.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=list(DTYPES))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--prefixes", nargs="+", type=int, default=list(PREFIXES),
                    help="image-prefix lengths; the multimodal / text-only ratio needs 0 among them")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=WARMUP, help="untimed calls of every variant before timing")
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--decoded", nargs="+", default=["text"],
                    help="decoded modalities: text, and any other name for a new modality with its own tables")
    ap.add_argument("--new-vocab", type=int, default=NEW_VOCAB, help="the new decoded modality's vocabulary")
    ap.add_argument("--no-hf", dest="hf", action="store_false")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--no-triton", dest="triton", action="store_false", help="skip the fused Triton kernels")
    ap.add_argument("--skip", nargs="+", default=[], choices=IMPLS, help="leave out these rows")
    ap.add_argument("--pdl", action="store_true",
                    help="launch the Triton kernels with programmatic dependent launch (Hopper; off by default)")
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
        args.models, args.dtypes, args.batches, args.prefixes = ["smoke"], ["fp32"], [1, 2], [0, 16, 64]
        args.new_tokens, args.prompt, args.repeats, args.vocab, args.warmup = 8, 4, 1, 512, 1
        args.new_vocab = 64
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
