"""export.py's work: checkpoint -> graphs -> cleanup -> shared weights -> model.json -> parity -> engines,
all in a staging directory that replaces artifacts/<name> only once everything succeeded."""
from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

import onnx
import torch
from omegaconf import DictConfig, OmegaConf

from mmgpt.checkpoint import CheckpointError, find_latest, load_checkpoint, weights_hash
from mmgpt.export.artifacts import MODEL_JSON, Artifacts, staging_dir, write_json_atomic
from mmgpt.export.graphs import graph_specs
from mmgpt.export.onnx_export import OPSET, ExportError, check_contract, cleanup, io_dims, save_with_shared_weights, \
    trace
from mmgpt.export.parity import format_table, run_parity

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_ONNX_DTYPE_NAME = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
                    onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.INT64: "int64"}


def resolve_checkpoint(cfg: DictConfig) -> Path:
    if cfg.ckpt:
        return Path(cfg.ckpt)
    latest = find_latest(cfg.train_root, "**/checkpoints/last.ckpt")
    if latest is None:
        raise CheckpointError(f"no last.ckpt under {Path(cfg.train_root).resolve()}; train first "
                              "(`python train.py +experiment=digits`) or pass ckpt=/path/to/last.ckpt")
    return latest


def export(cfg: DictConfig) -> Path:
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype={cfg.dtype!r}: choose one of {sorted(DTYPES)}")
    t_start = time.perf_counter()
    ckpt = resolve_checkpoint(cfg)
    loaded = load_checkpoint(ckpt)
    model = loaded.model.to(DTYPES[cfg.dtype])
    mc = model.config
    name = cfg.name or ckpt.parent.parent.name  # outputs/train/<run>/checkpoints/last.ckpt -> <run>
    final = Path(cfg.output_root) / name
    limits = {"max_batch": cfg.limits.max_batch, "max_prefix": cfg.limits.max_prefix,
              "max_text": cfg.limits.max_text, "max_cache": cfg.limits.max_cache or mc.block_size}
    if limits["max_cache"] > mc.block_size:
        raise ValueError(f"limits.max_cache={limits['max_cache']} exceeds the model's {mc.block_size} positions")
    print(f"exporting {ckpt} ({model.num_params() / 1e6:.2f}M params, {cfg.dtype}) -> {final}")

    with staging_dir(final) as out:
        specs = graph_specs(model, DTYPES[cfg.dtype], **limits)
        models, graphs, stats = {}, {}, {}
        for spec in specs.values():
            t0 = time.perf_counter()
            proto, stats[spec.name] = cleanup(trace(spec))
            check_contract(proto, spec)
            models[spec.name] = proto
            graphs[spec.name] = {"file": f"{spec.name}.onnx", **_io_contract(proto)}
            print(f"  {spec.name:<19} {stats[spec.name]['nodes_before']:>4} -> {stats[spec.name]['nodes_after']:>4}"
                  f" nodes  ({time.perf_counter() - t0:.1f}s)")
        sizes = save_with_shared_weights(models, out)
        for spec_name in models:
            onnx.checker.check_model(str(out / f"{spec_name}.onnx"))
        meta = {
            "format": 1, "name": name, "created": datetime.datetime.now().isoformat(timespec="seconds"),
            "checkpoint": str(ckpt.resolve()), "model_config": mc.to_dict(), "tokenizer": loaded.tokenizer.to_dict(),
            "prefix_len": loaded.prefix_len, "data": loaded.data_config, "dtype": str(DTYPES[cfg.dtype]).removeprefix("torch."),
            "opset": OPSET, "weights_sha256": weights_hash(model), "limits": limits,
            "kv_cache": {"layout": "per layer (B, H, S, D); the runtime keeps one (L, B, H, S, D) buffer per bucket",
                         "capacity_buckets": [int(s) for s in cfg.capacity_buckets]},
            "graphs": graphs, "cleanup": stats, "sizes": sizes, "engines": {},
        }
        write_json_atomic(out / MODEL_JSON, meta)
        artifacts = Artifacts(out)
        if cfg.parity.enabled:
            parity = run_parity(model, artifacts, loaded.prefix_len or 8, seed=cfg.parity.seed)
            write_json_atomic(out / "parity.json", parity)
            print(format_table(parity))
            if cfg.parity.enforce and not parity.get("passed", True):
                raise ExportError(f"parity failed (see the table above); nothing was written to {final}. "
                                  "Set parity.enforce=false to keep the artifacts anyway")
        if cfg.engine.runtime != "none":
            from mmgpt.engines.build import build_engines
            build_engines(artifacts, OmegaConf.to_container(cfg.engine, resolve=True))
    mb = sizes["weights_bytes"] / 2**20
    print(f"weights: {mb:.1f} MiB stored once in {sizes['weights_file']} "
          f"({sizes['bytes_if_not_shared'] / 2**20:.1f} MiB if each graph kept its own)")
    print(f"wrote {final}  ({time.perf_counter() - t_start:.0f}s)")
    return final


def _io_contract(model: onnx.ModelProto) -> dict:
    dims = io_dims(model)

    def describe(vis):
        return {vi.name: {"dtype": _ONNX_DTYPE_NAME.get(vi.type.tensor_type.elem_type, str(vi.type.tensor_type.elem_type)),
                          "shape": dims[vi.name]} for vi in vis}
    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


def print_json(path: Path) -> None:
    print(json.dumps(json.loads(Path(path).read_text()), indent=2))
