"""export.py's work.

From a checkpoint: graphs -> cleanup -> weights.bin (shared) -> manifest -> hf/ -> parity, all in a staging
directory that replaces artifacts/<name> only once everything succeeded; then engines, if asked for.
From existing artifacts (`artifacts=<dir>`): engines only, without the checkpoint and without re-tracing.
"""
from __future__ import annotations

import datetime
import time
from pathlib import Path

import onnx
import torch
from omegaconf import DictConfig, OmegaConf

from mmgpt.checkpoint import CheckpointError, find_latest, load_checkpoint
from mmgpt.contract.artifacts import Artifacts
from mmgpt.files import check_component, remove_stale_staging, staging_dir, write_json
from mmgpt.contract.graphs import ModelDims, declare_graphs
from mmgpt.contract.manifest import MANIFEST_FILE, GraphFile, Limits, Manifest, WeightsFile
from mmgpt.contract.weights import index_state_dict, record_files
from mmgpt.contract.engines import EngineConfig
from mmgpt.engines.build import build_engines, check_engine_config
from mmgpt.engines.trt import EngineError
from mmgpt.export.onnx_graphs import OPSET, WEIGHTS_FILE, ExportError, check_against_declaration, cleanup, \
    save_with_shared_weights, trace
from mmgpt.export.parity import format_table, run_parity
from mmgpt.errors import UserError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_checkpoint(cfg: DictConfig) -> Path:
    if cfg.ckpt:
        return Path(cfg.ckpt)
    latest = find_latest(cfg.train_root, "**/checkpoints/last.ckpt")
    if latest is None:
        raise CheckpointError(f"no last.ckpt under {Path(cfg.train_root).resolve()}; train first "
                              "(`python train.py +experiment=digits`) or pass ckpt=/path/to/last.ckpt")
    return latest


def export(cfg: DictConfig) -> Path:
    engine_cfg = EngineConfig.from_dict(OmegaConf.to_container(cfg.engine, resolve=True))
    check_engine_config(engine_cfg)  # a bad engine option fails in the first second, not after the tracing
    if cfg.artifacts:
        return build_from_artifacts(Path(cfg.artifacts), engine_cfg)
    if cfg.dtype not in DTYPES:
        raise UserError(f"dtype={cfg.dtype!r}: choose one of {sorted(DTYPES)}")
    buckets = [int(s) for s in cfg.capacity_buckets]
    if not buckets or min(buckets) < 1:
        raise UserError(f"capacity_buckets={list(cfg.capacity_buckets)} must be a non-empty list of sizes >= 1")
    t_start = time.perf_counter()
    ckpt = resolve_checkpoint(cfg)
    loaded = load_checkpoint(ckpt)
    check_finite(loaded.model, f"{ckpt}", "the training diverged or the checkpoint is damaged")
    model = loaded.model.to(DTYPES[cfg.dtype])
    check_finite(model, f"{ckpt} in {cfg.dtype}", "a weight exceeds the range of the dtype: export with dtype=bf16 "
                 "or fp32")
    config = model.config
    limits = export_limits(cfg, config.block_size)
    check_buckets(buckets, sum(loaded.context_lens.values()), config.block_size)
    name = export_name(cfg.name, ckpt)
    root = Path(cfg.output_root)
    for stale, action in remove_stale_staging(root):
        print(f"{action} {stale}, left by an export that was killed")
    final = root / name
    if final.exists() and not (final / MANIFEST_FILE).is_file():
        raise UserError(f"{final} exists and is not an export (no {MANIFEST_FILE}); export.py replaces only its own "
                        "exports: pass another name= or output_root=")
    dtype_name = str(DTYPES[cfg.dtype]).removeprefix("torch.")
    print(f"exporting {ckpt} ({model.num_params() / 1e6:.2f}M params, {cfg.dtype}) -> {final}")

    try:
        with staging_dir(final) as out:
            graphs = declare_graphs(ModelDims.of(config))
            protos, stats = {}, {}
            for graph in graphs.values():
                t0 = time.perf_counter()
                proto, stats[graph.name] = cleanup(trace(model, graph, DTYPES[cfg.dtype], limits))
                check_against_declaration(proto, graph, dtype_name)
                protos[graph.name] = proto
                print(f"  {graph.name:<19} {stats[graph.name]['nodes_before']:>4} -> "
                      f"{stats[graph.name]['nodes_after']:>4} nodes  ({time.perf_counter() - t0:.1f}s)")
            with open(out / WEIGHTS_FILE, "wb") as blob:
                offsets: dict[bytes, int] = {}
                sizes = save_with_shared_weights(protos, out, blob, offsets)
                index = index_state_dict(model.state_dict(), blob, offsets)  # the PyTorch backends read these
            for graph_name in protos:
                onnx.checker.check_model(str(out / f"{graph_name}.onnx"))
            tokenizer = loaded.tokenizer.save(out)
            on_disk = record_files(out)
            manifest = Manifest(
                name=name, created=datetime.datetime.now().isoformat(timespec="seconds"), source=str(ckpt.resolve()),
                model_config=config.to_dict(), tokenizer=tokenizer, context_lens=loaded.context_lens,
                data=loaded.data_config, dtype=dtype_name, opset=OPSET, limits=limits, capacity_buckets=buckets,
                weights=WeightsFile(file=WEIGHTS_FILE, nbytes=on_disk[WEIGHTS_FILE].nbytes,
                                    sha256_tree=on_disk[WEIGHTS_FILE].sha256_tree, tensors=index),
                graphs={g.name: GraphFile(file=f"{g.name}.onnx", **g.io(dtype_name)) for g in graphs.values()},
                stats={"cleanup": stats, "sizes": sizes})
            manifest.seal(out, on_disk)
            manifest.write(out)
            artifacts = Artifacts.open(out)
            if cfg.hf.enabled:
                from mmgpt.hf import save_hf
                save_hf(model, loaded.tokenizer, out / "hf")
            if cfg.parity.enabled:
                parity = run_parity(model, artifacts, seed=cfg.parity.seed)
                write_json(out / "parity.json", parity)
                print(format_table(parity))
                if cfg.parity.enforce and not parity.get("passed", True):
                    raise ExportError(f"parity failed (see the table above); nothing was written to {final}. "
                                      "Set parity.enforce=false to keep the artifacts anyway")
            manifest.seal(out, record_files(out))  # hf/ and parity.json too: every file a reader may use
            manifest.write(out)
    except OSError as e:  # unwritable, not a directory, disk full: the staging directory is already gone
        raise ExportError(f"cannot write the artifacts under output_root={root} ({e.strerror or e}: "
                          f"{e.filename or root}); pass a writable output_root=... with room for them") from None
    mb = sizes["weights_bytes"] / 2**20
    print(f"weights: {mb:.1f} MiB stored once in {WEIGHTS_FILE} "
          f"({sizes['bytes_if_not_shared'] / 2**20:.1f} MiB if each graph kept its own)")
    print(f"wrote {final}  ({time.perf_counter() - t_start:.0f}s)")
    if engine_cfg.runtime != "none":
        build_from_artifacts(final, engine_cfg)
    return final


def export_name(name: str | None, ckpt: Path) -> str:
    """name=..., else the training run's directory: outputs/train/<run>/checkpoints/last.ckpt -> <run>. A checkpoint
    elsewhere has no run name to take: the user names the export."""
    if name is None:
        run = ckpt.resolve().parent
        if run.name != "checkpoints" or not run.parent.name:
            raise UserError(f"ckpt={ckpt} does not lie in <run>/checkpoints/, so the export has no run name to take; "
                            "pass name=<export name> (it becomes <output_root>/<name>)")
        name = run.parent.name
    return check_component(str(name))


def build_from_artifacts(path: Path, engine_cfg: EngineConfig) -> Path:
    """Engines into an existing artifacts directory (the TensorRT samples' build step). A failure leaves the
    artifacts as they were and says how to retry."""
    artifacts = Artifacts.open(path)
    if engine_cfg.runtime == "none":
        raise UserError("artifacts=... builds engines: pass engine=tensorrt or engine=tensorrt_rtx (or auto)")
    try:
        build_engines(artifacts, engine_cfg)
    except EngineError as e:
        raise EngineError(f"{e}\nThe artifacts in {path} are complete without engines; retry with "
                          f"`python export.py artifacts={path} engine=...`") from None
    return path


def export_limits(cfg: DictConfig, block_size: int) -> Limits:
    """The largest size of each dynamic dim: unset ones default to the model's context."""
    raw = {k: cfg.limits.get(k) for k in ("max_batch", "max_context", "max_text", "max_cache")}
    limits = Limits(**{k: int(v) if v is not None else block_size for k, v in raw.items()})
    for k, v in vars(limits).items():
        if v < 1:
            raise UserError(f"limits.{k}={v} must be >= 1")
    for k in ("max_context", "max_text", "max_cache"):
        if getattr(limits, k) > block_size:
            raise UserError(f"limits.{k}={getattr(limits, k)} exceeds the model's {block_size} positions")
    return limits


def check_buckets(buckets: list[int], context_len: int, block_size: int) -> None:
    """Every capacity bucket must hold the trained context lengths (or one position), a one-token prompt and one
    generated token; the decode loop caps buckets at the model's positions, so that cap counts."""
    need = (context_len or 1) + 1 + 1
    small = [s for s in buckets if min(s, block_size) < need]
    if small:
        raise UserError(f"capacity_buckets={buckets}: {small} cannot hold the context ({context_len or 1} positions) + "
                        f"a prompt token + one generated token = {need}; use sizes >= {need}, e.g. "
                        f"capacity_buckets=[{max(need, 64)}]")


def check_finite(model: torch.nn.Module, where: str, why: str) -> None:
    """NaN or infinite weights give NaN logits whatever the graphs do: refuse them, naming the tensor."""
    for name, t in model.state_dict().items():
        bad = int((~torch.isfinite(t)).sum()) if t.is_floating_point() else 0
        if bad:
            raise ExportError(f"{where}: weight {name} holds {bad} NaN or infinite value(s) of {t.numel()}; {why}. "
                              "Export refuses it whatever parity.enforce says")
