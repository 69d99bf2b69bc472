"""ONNX Runtime against PyTorch, on shapes not used for tracing, and a chained greedy generation."""
from __future__ import annotations

import torch

from mmgpt.contract.artifacts import Artifacts
from mmgpt.contract.graphs import BATCH, CACHE, PROMPT, ModelDims, context_feed, interleave, length_symbol, \
    past_names, present_names
from mmgpt.export.onnx_graphs import trace_sizes
from mmgpt.model import TEXT, MultimodalGPT
from mmgpt.runtime.backends.onnx_runtime import OnnxRuntimeBackend
from mmgpt.runtime.backends.torch_model import TorchBackend
from mmgpt.runtime.generator import Generator

# Bounds on |ORT - PyTorch| of every output tensor (logits and each KV output). fp32: absolute, what a different
# summation order leaves. fp16 keeps ~3 significant digits and both sides round differently, so each tensor's error
# is taken relative to that tensor's own largest magnitude (at least 1): a KV error is not hidden by large logits.
TOLERANCE = {"float32": 1e-4, "float16": 2e-2}
CHAIN_STEPS = 32


def random_context(dims: ModelDims, B: int, length: int, fixed: dict[str, int], g: torch.Generator, dtype,
                   ragged: bool = True) -> dict:
    """A context of every modality: features of the trained length (else `length`), ids of up to `length`
    tokens with ragged lengths (the first row full) where `ragged`."""
    context = {}
    for m in dims.context:
        n = fixed.get(m.name, length)
        if m.kind == "continuous":
            context[m.name] = torch.randn(B, n, m.dim, generator=g).to(dtype)
        else:
            lengths = torch.randint(0, n + 1, (B,), generator=g) if ragged else torch.full((B,), n)
            lengths[0] = n
            context[m.name] = (torch.randint(0, m.vocab_size, (B, n), generator=g), lengths)
    return context


def run_parity(model: MultimodalGPT, artifacts: Artifacts, seed: int = 0) -> dict:
    manifest = artifacts.manifest
    dtype = manifest.dtype
    if dtype == "bfloat16":
        return {"skipped": "ONNX Runtime's CPU provider has no bfloat16 kernels; parity is checked for fp32 / fp16"}
    cfg, dims = model.config, manifest.dims
    torch_dtype = next(model.parameters()).dtype
    g = torch.Generator().manual_seed(seed)
    ort_backend = OnnxRuntimeBackend(artifacts)  # its sessions serve the shape cases and the chained run
    prefill, decode = ort_backend.prefill_session, ort_backend.decode_session
    traced = trace_sizes(dims)
    rows = []

    names = ["logits", *present_names(cfg.n_layer)]  # the order of each graph's outputs

    def record(graph, shape, ref, got):
        rows.append({"graph": graph, "shape": shape, **output_error(names, ref, [torch.from_numpy(o) for o in got],
                                                                    dtype)})

    with torch.no_grad():
        for B in (1, 3):
            for n in (1, 6):  # each context modality's (untrained) length: shapes not used for tracing
                for T in (1, 4, 9):
                    if (B, T) == (traced[BATCH], traced[PROMPT]):
                        continue
                    context = random_context(dims, B, n, manifest.context_lens, g, torch_dtype)
                    ids = torch.randint(0, dims.vocab_size, (B, T), generator=g)
                    lengths = torch.randint(1, T + 1, (B,), generator=g)
                    lengths[0] = T  # at least one row unpadded
                    logits, k, v = model.forward_cached(context, ids, lengths, torch.zeros_like(lengths), None, None)
                    feed = {name: t.numpy() for name, t in context_feed(dims, context).items()}
                    got = prefill.run(None, {**feed, "input_ids": ids.numpy(), "input_lengths": lengths.numpy()})
                    shape = {"batch": B, **{length_symbol(m): (c if torch.is_tensor(c) else c[0]).shape[1]
                                            for m, c in context.items()}, "prompt_len": T}
                    record("prefill", shape, [logits, *interleave(k, v)], got)
            for S in (16, 40):
                if S == traced[CACHE]:
                    continue
                positions = torch.randint(1, S, (B, 1), generator=g)
                ids = torch.randint(0, dims.vocab_size, (B, 1), generator=g)
                past = [torch.randn(B, cfg.n_kv_head, S, cfg.head_dim, generator=g).to(torch_dtype)
                        for _ in range(2 * cfg.n_layer)]
                logits, k, v = model.forward_cached(None, ids, torch.ones(B, dtype=torch.long), positions[:, 0],
                                                    past[0::2], past[1::2])
                feed = {"input_ids": ids.numpy(), "position_ids": positions.numpy(),
                        **{n: t.numpy() for n, t in zip(past_names(cfg.n_layer), past)}}
                record("decode", {"batch": B, "cache_len": S, "positions": positions[:, 0].tolist()},
                       [logits, *interleave(k, v)], decode.run(None, feed))

    bound = TOLERANCE[dtype]
    worst = max(r["error"] for r in rows)
    chained = chained_generation(model, ort_backend, artifacts, seed)
    return {"dtype": dtype, "tolerance": bound, "tolerance_kind": "absolute" if dtype == "float32" else
            "relative to each tensor's max |value|", "worst": worst, "bound_held": worst <= bound, "cases": rows,
            "chained": chained, "passed": worst <= bound and chained["tokens_match"]}


def output_error(names: list[str], ref: list[torch.Tensor], got: list[torch.Tensor], dtype: str) -> dict:
    """The worst error over a graph's outputs, each output against its own scale: absolute for float32, relative to
    the tensor's largest magnitude (at least 1) otherwise. Names the output it came from."""
    errors = []
    for name, r, o in zip(names, ref, got, strict=True):
        diff = float((o.float() - r.float()).abs().max())
        scale = 1.0 if dtype == "float32" else max(1.0, float(r.float().abs().max()))
        errors.append((diff / scale, diff, name))
    error, diff, name = max(errors)
    return {"error": error, "max_abs_diff": max(e[1] for e in errors), "worst_output": name}


def chained_generation(model: MultimodalGPT, ort_backend: OnnxRuntimeBackend, artifacts: Artifacts,
                       seed: int = 0) -> dict:
    """Prefill + CHAIN_STEPS greedy decode steps through ONNX Runtime (the loop writing the KV cache) must give
    exactly PyTorch's tokens, on a batch with ragged prompts (and a ragged context, where it is discrete)."""
    manifest, tok = artifacts.manifest, artifacts.tokenizer
    dims = manifest.dims
    g = torch.Generator().manual_seed(seed + 1)
    context = random_context(dims, 3, 8, manifest.context_lens, g, torch.float32)
    start = tok.bos_id if dims.decoded.name == TEXT else dims.decoded.end_id
    tail = torch.randint(0, dims.vocab_size, (3,), generator=g).tolist()
    prompts = [[start], [start, tail[0]], [start, *tail]]
    results = {}
    for name, backend in (("torch", TorchBackend(model, context_lens=manifest.context_lens)),
                          ("onnxruntime", ort_backend)):
        gen = Generator(backend, tok, max_positions=model.config.block_size, cuda_graph=False,
                        eos_check_interval=CHAIN_STEPS + 1)  # never stop early: all 32 steps run
        results[name] = gen.generate(context, prompts, max_new_tokens=CHAIN_STEPS + 1)
    a, b = results["torch"].tokens, results["onnxruntime"].tokens
    return {"batch": 3, "prompt_lengths": [len(p) for p in prompts], "decode_steps": results["torch"].decode_steps,
            "tokens_match": bool(torch.equal(a, b)), "torch_tokens": a.tolist(), "onnxruntime_tokens": b.tolist()}


def format_table(parity: dict) -> str:
    if "skipped" in parity:
        return f"parity skipped: {parity['skipped']}"
    lines = [f"{'graph':<9} {'shape':<58} {'max|diff|':>10} {'error':>10}  worst output"]
    for r in parity["cases"]:
        shape = ", ".join(f"{k}={v}" for k, v in r["shape"].items())
        lines.append(f"{r['graph']:<9} {shape:<58} {r['max_abs_diff']:>10.2e} {r['error']:>10.2e}  "
                     f"{r['worst_output']}")
    c = parity["chained"]
    lines.append(f"worst {parity['worst']:.2e} vs tolerance {parity['tolerance']:.0e} ({parity['tolerance_kind']}): "
                 f"{'held' if parity['bound_held'] else 'VIOLATED'}")
    lines.append(f"chained greedy, ragged batch {c['prompt_lengths']}, {c['decode_steps']} decode steps: tokens "
                 f"{'match' if c['tokens_match'] else 'DIFFER'}")
    return "\n".join(lines)
