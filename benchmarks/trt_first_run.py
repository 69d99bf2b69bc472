"""The first run on a GPU that can execute TensorRT engines: the checklist, in order, into one results JSON.

    python benchmarks/trt_first_run.py --artifacts artifacts/<name> [--runtime auto|tensorrt|tensorrt_rtx]
                                       [--compute-capability SM89] [--out DIR] [--smoke]

No GPU this project tests on can execute an engine (TensorRT-RTX refuses compute capability 9.0; full TensorRT is
not installable there), so the engine runtime was written from the documentation and its call protocol is pinned
by tests with a recording stand-in. This script is what a user with such a GPU runs first; it stops at the first
step that cannot be done here and writes why:

 1. environment: the TensorRT module and version, the GPU
 2. build both strategies into the artifacts directory (TensorRT's INFO log kept: weights and activation memory)
 3. inspect every engine: I/O, per-profile shapes
 4. load the engines (GPU memory before and after creating the session)
 5. per-profile shape inference: every declared output shape at each profile's min / opt / max
 6. logits against PyTorch at batch 1 and 3 with ragged prompts (prefill and 8 decode steps)
 7. capture bucket A, then B, then replay A: tokens equal to un-captured execution
 8. decode tok/s beside torch-triton at batch 1 and 8
`--smoke` stops after the inspection (CI runs it on a CPU with TensorRT-RTX).
"""
from __future__ import annotations

import argparse
import datetime
import time
import traceback
from pathlib import Path

import torch

from mmgpt.bench.results import git_commit, result_path
from mmgpt.contract.artifacts import Artifacts
from mmgpt.contract.engines import STRATEGIES, EngineConfig
from mmgpt.engines.build import build_engines, profile_sizes
from mmgpt.engines.inspection import inspect_engine
from mmgpt.engines.trt import import_runtime, runtime_name
from mmgpt.files import write_json


class Checklist:
    def __init__(self, out: Path, artifacts: Path):
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        self.report = {"date": datetime.date.today().isoformat(), "gpu": gpu, "commit": git_commit(),
                       "artifacts": str(artifacts),
                       "torch": torch.__version__, "steps": [], "status": "running"}
        self.path = result_path(out, self.report["date"], gpu, "trt-first-run")

    def step(self, name: str, fn) -> dict | None:
        """Run one step; record its result or why it failed. None stops the checklist."""
        t0 = time.perf_counter()
        try:
            result = fn()
            self.report["steps"].append({"step": name, "ok": True, "seconds": round(time.perf_counter() - t0, 2),
                                         **(result or {})})
            return result or {}
        except Exception as e:  # noqa: BLE001 -- the checklist's point: record why, stop there
            self.report["steps"].append({"step": name, "ok": False, "error": f"{type(e).__name__}: {e}",
                                         "traceback": traceback.format_exc(limit=4)})
            self.report["status"] = f"stopped at {name}"
            return None
        finally:
            write_json(self.path, self.report)


def environment(runtime: str) -> dict:
    trt = import_runtime(runtime)
    info = {"runtime": runtime_name(trt), "version": trt.__version__}
    if torch.cuda.is_available():
        info["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return info


def build(artifacts: Artifacts, cfg: EngineConfig) -> dict:
    out = {}
    for strategy in STRATEGIES:
        entry = build_engines(artifacts, cfg.replace(strategy=strategy))
        if entry is None:
            raise RuntimeError(f"engines for {strategy} were skipped (see the line above)")
        out[strategy] = {"total_bytes": entry.total_bytes, "builder_weights_bytes": entry.builder_weights_bytes,
                         "context_past_slots": entry.context_past_slots,
                         "engines": {n: {"bytes": e.bytes, "builder_weights_bytes": e.builder_weights_bytes,
                                         "build_s": e.build_s} for n, e in entry.engines.items()}}
    return out


def inspect(artifacts: Artifacts) -> dict:
    return {name: {k: info[k] for k in ("source", "bytes", "builder_weights_bytes", "profiles")}
            for build in artifacts.manifest.engines.values() for name, e in build.engines.items()
            for info in [inspect_engine(artifacts.path / e.file)]}


def load(artifacts: Artifacts, strategy: str, loaded: dict) -> dict:
    """The backend goes into `loaded`; the step records the GPU memory the session took."""
    from mmgpt.runtime.backends.tensorrt_engines import TensorRTBackend
    if not torch.cuda.is_available():
        raise RuntimeError("executing a TensorRT engine needs a CUDA GPU; this machine has none")
    free_before = torch.cuda.mem_get_info()[0]
    loaded["backend"] = TensorRTBackend(artifacts, strategy)
    torch.cuda.synchronize()
    return {"gpu_memory_used_by_session_mib": round((free_before - torch.cuda.mem_get_info()[0]) / 2**20, 1)}


def shape_inference(backend, artifacts: Artifacts, cfg: EngineConfig) -> dict:
    """On a fresh context per profile: set each input's min / opt / max shape, read back every output's shape."""
    sizes = profile_sizes(artifacts, cfg, backend.context_past)
    checked, wrong = 0, []
    for flow in (backend.prefill_flow, backend.decode_flow):
        ctx = flow.session.new_context(flow.profile, backend._memory, torch.cuda.current_stream().cuda_stream)
        for corner in range(3):
            dims = {k: v[corner] for k, v in sizes[flow.name].items()}
            for t in flow.graph.inputs:
                ctx.set_input_shape(t.name, t.shape(dims))
            for t in flow.graph.outputs:
                got, want = tuple(ctx.get_tensor_shape(t.name)), t.shape(dims)
                checked += 1
                if got != want:
                    wrong.append(f"{flow.session.path.name}/{flow.name}/{corner}: {t.name} {got} != {want}")
    if wrong:
        raise AssertionError("; ".join(wrong[:5]))
    return {"output_shapes_checked": checked}


def logits_against_torch(backend, artifacts: Artifacts) -> dict:
    from mmgpt.runtime.backends.torch_model import TorchBackend
    reference = TorchBackend(artifacts.load_model("cuda"))
    m = artifacts.manifest
    tok = artifacts.tokenizer
    worst = {}
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.inference_mode():
        for B in (1, 3):
            prefix = torch.rand(B, m.context_lens.get("image", 8), m.config.modality("image").dim, device="cuda")
            lengths = torch.tensor([1, 3, 6][:B], device="cuda")
            ids = torch.full((B, int(lengths.max())), tok.pad_id, device="cuda")
            for b in range(B):
                ids[b, : lengths[b]] = torch.randint(0, min(256, m.config.vocab_size), (int(lengths[b]),))
            diffs = []
            caches = []
            for be in (backend, reference):
                logits, keys, values = be.prefill(prefix, ids, lengths)
                k = torch.zeros(m.config.n_layer, B, m.config.n_head, 64, m.dims.head_dim, dtype=be.dtype,
                                device="cuda")
                v = torch.zeros_like(k)
                N = keys[0].shape[2]
                k[:, :, :, :N] = torch.stack(keys)
                v[:, :, :, :N] = torch.stack(values)
                caches.append((logits, k, v))
            scale = caches[1][0].float().abs().max().item()
            diffs.append((caches[0][0].float() - caches[1][0].float()).abs().max().item() / scale)
            pos = ((m.context_lens.get("image", 8)) + lengths)[:, None]  # each row's next slot: prefix + its prompt
            token = caches[1][0].argmax(-1, keepdim=True)
            for _ in range(8):
                a = backend.decode(token, pos, caches[0][1], caches[0][2])
                r = reference.decode(token, pos, caches[1][1], caches[1][2])
                diffs.append((a.float() - r.float()).abs().max().item() / r.float().abs().max().item())
                token, pos = r.argmax(-1, keepdim=True), pos + 1
            worst[f"batch_{B}"] = max(diffs)
    bound = 1e-3 if m.dtype == "float32" else 2e-2
    if max(worst.values()) > bound:
        raise AssertionError(f"logits differ from PyTorch by up to {max(worst.values()):.2e} of the largest logit "
                             f"(bound {bound})")
    return {"max_rel_logit_diff": worst, "bound": bound}


def capture_interleaved(backend, artifacts: Artifacts) -> dict:
    from mmgpt.runtime.generator import Generator
    m = artifacts.manifest
    prefix = torch.rand(2, m.context_lens.get("image", 8), m.config.modality("image").dim)
    graphed = Generator(backend, artifacts.tokenizer, m.capacity_buckets, m.config.block_size, cuda_graph=True,
                        eos_check_interval=1000)
    eager = Generator(backend, artifacts.tokenizer, m.capacity_buckets, m.config.block_size, cuda_graph=False,
                      eos_check_interval=1000)
    runs = [graphed.generate(prefix, max_new_tokens=n) for n in (20, 100, 20)]
    want = [eager.generate(prefix, max_new_tokens=n) for n in (20, 100)]
    same = [torch.equal(runs[0].tokens, want[0].tokens), torch.equal(runs[1].tokens, want[1].tokens),
            torch.equal(runs[2].tokens, want[0].tokens)]
    if not all(same):
        raise AssertionError(f"captured tokens differ from un-captured ones (A, B, A again: {same})")
    return {"capacities": [r.capacity for r in runs], "captured": [r.cuda_graph for r in runs],
            "graph_captures": graphed.graph_captures}


def speed(backend, artifacts: Artifacts) -> dict:
    """Decode tok/s of the engines and of the fused Triton kernels on the same weights, same shapes."""
    from mmgpt.bench.decode import bench_mmgpt
    from mmgpt.runtime.backends.fused_triton import TritonBackend
    triton = TritonBackend(artifacts.load_model("cuda"))
    rows = {}
    for B in (1, 8):
        for name, be in (("tensorrt", backend), ("torch_triton", triton)):
            r = bench_mmgpt(be, B, 8, 64, backend.context_lens.get("image", 8), torch.device("cuda"), repeats=2)
            rows[f"{name}_b{B}_tokens_per_s"] = round(r["tokens_per_s"], 1)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", required=True)
    ap.add_argument("--runtime", default="auto", choices=["auto", "tensorrt", "tensorrt_rtx"])
    ap.add_argument("--compute-capability", default="auto", help="TensorRT-RTX target; a CPU machine needs one")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--smoke", action="store_true", help="stop after building and inspecting (CI, on a CPU)")
    args = ap.parse_args(argv)
    cfg = EngineConfig.defaults(runtime=args.runtime, compute_capability=args.compute_capability)
    run = Checklist(Path(args.out), Path(args.artifacts))
    artifacts = Artifacts.open(args.artifacts)
    ok = run.step("environment", lambda: environment(args.runtime)) is not None
    ok = ok and run.step("build", lambda: build(artifacts, cfg)) is not None
    ok = ok and run.step("inspect", lambda: {"engines": inspect(Artifacts.open(args.artifacts))}) is not None
    if ok and args.smoke:
        run.report["status"] = "smoke: built and inspected; execution not attempted"
    elif ok:
        artifacts = Artifacts.open(args.artifacts)
        for strategy in STRATEGIES:
            loaded = {}
            if run.step(f"load {strategy}", lambda: load(artifacts, strategy, loaded)) is None:
                break
            backend = loaded["backend"]
            steps = (("shape inference", lambda: shape_inference(backend, artifacts, cfg)),
                     ("logits against torch", lambda: logits_against_torch(backend, artifacts)),
                     ("capture A, B, replay A", lambda: capture_interleaved(backend, artifacts)),
                     ("tok/s", lambda: speed(backend, artifacts)))
            if not all(run.step(f"{name} ({strategy})", fn) is not None for name, fn in steps):
                break
        else:
            run.report["status"] = "passed"
    write_json(run.path, run.report)
    print(f"{run.report['status']}; wrote {run.path}")
    return run.report


if __name__ == "__main__":
    main()
