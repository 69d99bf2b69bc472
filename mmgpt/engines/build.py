"""Artifacts -> TensorRT engines, built on the machine (GPU and TensorRT version) that will run them, from the
ONNX graphs alone: no checkpoint, no re-tracing.

  two_engines  prefill.engine (prefill.onnx) + decode.engine (decode.onnx): the weights are stored twice.
  shared       shared.engine from context_generation.onnx with two optimization profiles -- context (no past)
               and generation (no prefix, one token) -- over one copy of the weights: one engine, two flows.

Networks are strongly typed: precision comes from the ONNX dtypes, never from builder flags.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

from mmgpt.contract.artifacts import Artifacts
from mmgpt.contract.engines import ENGINES, EngineBuild, EngineConfig, EngineFile, min_opt_max
from mmgpt.files import write_atomic
from mmgpt.contract.graphs import BATCH, CACHE, PROMPT, GraphDecl, declare_graphs, length_symbol
from mmgpt.engines.trt import EngineError, TensorRTUnavailable, TrtLog, dtype_name, import_runtime, is_rtx, \
    runtime_name
from mmgpt.errors import UserError

_WEIGHTS_LOG = re.compile(r"Total Weights Memory:\s*(\d+)\s*bytes", re.I)


def check_engine_config(cfg: EngineConfig) -> None:
    """What the engine options can get wrong beyond their own fields (EngineConfig checks those): the runtime and
    the target GPU, checked before any tracing or building."""
    if cfg.runtime == "none":
        return
    try:
        trt = import_runtime(cfg.runtime)
    except TensorRTUnavailable:
        if cfg.runtime == "auto":
            return
        raise
    if is_rtx(trt) and (cfg.compute_capability != "auto" or cfg.runtime != "auto"):  # auto without a GPU skips
        _rtx_target(trt, cfg.compute_capability)


def _clip(mom, hi, what):
    lo, opt, top = min_opt_max(mom, what)
    if lo > hi:
        raise UserError(f"engine.{what}={list(mom)}: min exceeds {hi}, the largest size exported into the ONNX "
                         "graphs (raise the export's limits.* to widen it)")
    return lo, min(opt, hi), min(top, hi)


def profile_sizes(artifacts: Artifacts, cfg: EngineConfig, context_past_slots: int = 0) -> dict[str, dict]:
    """Per profile name: (min, opt, max) of every dynamic dim, from the engine config clipped to the exported
    limits (so one default serves every model size)."""
    m = artifacts.manifest
    limits = m.limits
    b = _clip(cfg.profiles.batch, limits.max_batch, "profiles.batch")
    t = _clip(cfg.profiles.prompt, limits.max_text, "profiles.prompt")
    s = _clip(cfg.profiles.capacity, limits.max_cache, "profiles.capacity")
    lengths = {length_symbol(c.name): (m.context_lens[c.name],) * 3 if c.name in m.context_lens else
               (0, min(64, limits.max_context), limits.max_context) for c in m.dims.context}
    past = (context_past_slots,) * 3
    return {"context": {BATCH: b, **lengths, PROMPT: t, CACHE: past},
            "generation": {BATCH: b, **{k: (0, 0, 0) for k in lengths}, PROMPT: (1, 1, 1), CACHE: s}}


def profile_shapes(graph: GraphDecl, sizes: dict) -> dict[str, list[list[int]]]:
    """Per input of the graph: [min shape, opt shape, max shape]."""
    return {t.name: [list(t.shape({k: v[i] for k, v in sizes.items()})) for i in range(3)] for t in graph.inputs}


def build_engines(artifacts: Artifacts, cfg: EngineConfig) -> EngineBuild | None:
    """Build the configured strategy's engines into the artifacts directory and record them in model.json.
    Returns the manifest's `engines` entry. Raises with the reason, or returns None when `runtime: auto` finds
    no TensorRT module or no GPU to build for (printing how to build them)."""
    check_engine_config(cfg)
    runtime, strategy = cfg.runtime, cfg.strategy
    try:
        trt = import_runtime(runtime)
    except TensorRTUnavailable as e:
        if runtime == "auto":
            print(f"engines: skipped ({str(e).split(':')[0]}); install tensorrt-cu13 (H100 / H200 / B200) or "
                  f"tensorrt-rtx-cu13, then `python export.py artifacts={artifacts.path} engine=tensorrt`")
            return None
        raise
    if runtime == "auto" and not _have_gpu() and not (is_rtx(trt) and cfg.compute_capability != "auto"):
        print(f"engines: skipped (no GPU here; engines are built on the machine that runs them): on the serving "
              f"GPU run `python export.py artifacts={artifacts.path} engine=tensorrt`; to check the graphs compile "
              f"on this CPU, `engine=tensorrt_rtx engine.compute_capability=SM89`")
        return None
    graphs = declare_graphs(artifacts.manifest.dims)
    slots = cfg.context_past_slots
    for past in ((0, 1) if slots == "auto" else (int(slots),)):
        try:
            entry = _build_strategy(trt, artifacts, cfg, strategy, graphs, past)
            break
        except EngineError as e:
            # Myelin has refused reductions over statically empty tensors; the context profile's zero-length past
            # is one. One masked past slot computes the same thing (slot 0 is never < position 0).
            if past != 0 or slots != "auto" or strategy != "shared":
                raise
            print(f"engines: the build with an empty past failed ({str(e).splitlines()[0][:200]}); retrying with "
                  "one masked past slot")
    artifacts.record_engines(strategy, entry)
    return entry


def _build_strategy(trt, artifacts, cfg: EngineConfig, strategy, graphs, context_past_slots) -> EngineBuild:
    sizes = profile_sizes(artifacts, cfg, context_past_slots)
    cache_file = timing_cache_file(trt, cfg)
    built = {}
    for engine_name, (graph_name, profile_names) in ENGINES[strategy].items():
        t0 = time.perf_counter()
        graph = graphs[graph_name]
        profiles = {p: profile_shapes(graph, sizes[p]) for p in profile_names}
        plan, io, weights_bytes = _build_one(trt, artifacts.graph_path(graph_name), profiles, cfg, cache_file)
        out = artifacts.path / f"{engine_name}.engine"
        write_atomic(out, plan)
        built[engine_name] = EngineFile(file=out.name, bytes=out.stat().st_size, source=graph.name, io=io,
                                        profiles=profiles, builder_weights_bytes=weights_bytes,
                                        build_s=round(time.perf_counter() - t0, 2))
        weights = f", weights {weights_bytes / 2**20:.2f} MiB" if weights_bytes else ""
        print(f"  {out.name:<15} {out.stat().st_size / 2**20:8.2f} MiB{weights}  profiles {list(profile_names)}  "
              f"({built[engine_name].build_s:.1f}s, {runtime_name(trt)} {trt.__version__})")
    return EngineBuild(strategy=strategy, runtime=runtime_name(trt), version=trt.__version__,
                       weights_sha256_tree=artifacts.manifest.weights.sha256_tree,
                       target=_target_description(trt, cfg), context_past_slots=context_past_slots,
                       config=cfg.replace(strategy=strategy), engines=built)


def _build_one(trt, onnx_path: Path, profiles: dict, cfg: EngineConfig, cache_file: Path | None):
    log = TrtLog(trt)
    builder = trt.Builder(log.logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, log.logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the file: its external weights resolve beside it
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT's ONNX parser rejected {onnx_path.name}:\n{errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_mib << 20)
    config.builder_optimization_level = cfg.optimization_level
    if not cfg.tf32:
        # fp32 exports are compared token for token with PyTorch; TF32 matmuls (on by default) would break that
        config.clear_flag(trt.BuilderFlag.TF32)
    if is_rtx(trt):
        config.num_compute_capabilities = 1
        config.set_compute_capability(_rtx_target(trt, cfg.compute_capability), 0)
        # stream capture of an RTX engine needs user-managed allocation, fixed at build time
        config.set_flag(trt.BuilderFlag.REQUIRE_USER_ALLOCATION)
    cache = _load_timing_cache(config, cache_file) if cache_file else None
    for index, (name, shapes) in enumerate(profiles.items()):
        profile = builder.create_optimization_profile()
        for tensor, (lo, opt, hi) in shapes.items():
            profile.set_shape(tensor, lo, opt, hi)
        if index > 0 and hasattr(profile, "extra_memory_target"):
            profile.extra_memory_target = 0.0  # later profiles may not get weight copies of their own
        if config.add_optimization_profile(profile) < 0:
            raise EngineError(f"{onnx_path.name}: profile '{name}' was rejected: {shapes}. {log.take_errors()}")
    io = {}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        io[t.name] = {"mode": "input", "dtype": dtype_name(t.dtype), "shape": list(t.shape)}
    for i in range(network.num_outputs):
        t = network.get_output(i)
        io[t.name] = {"mode": "output", "dtype": dtype_name(t.dtype), "shape": list(t.shape)}
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"building an engine from {onnx_path.name} failed: {log.take_errors() or 'no reason given'}")
    if cache is not None:
        write_atomic(cache_file, bytes(memoryview(cache.serialize())))
    weights = [int(m.group(1)) for line in log.info for m in [_WEIGHTS_LOG.search(line)] if m]
    return bytes(memoryview(plan)), io, (weights[-1] if weights else None)


def _have_gpu() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def _rtx_target(trt, cc: str):
    if cc == "auto":
        if _have_gpu():
            return trt.ComputeCapability.CURRENT
        raise EngineError("engine.compute_capability=auto needs a GPU to read; on a CPU-only machine name the "
                          "target GPU, e.g. engine.compute_capability=SM89 (Ada) or SM86 / SM80 / SM120")
    try:
        return getattr(trt.ComputeCapability, cc.upper())
    except AttributeError:
        options = [n for n in dir(trt.ComputeCapability) if n.startswith("SM") or n == "CURRENT"]
        raise UserError(f"engine.compute_capability={cc!r}: TensorRT-RTX knows {options}") from None


def _target_description(trt, cfg: EngineConfig) -> str:
    if is_rtx(trt) and cfg.compute_capability != "auto":
        return cfg.compute_capability.upper()
    import torch
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{torch.cuda.get_device_name()} (compute capability {major}.{minor})"
    return "unknown"


def timing_cache_file(trt, cfg: EngineConfig) -> Path | None:
    """Full TensorRT's timing cache, one file per TensorRT version and GPU: a cache is only valid for the device
    properties and exact version it was made with. TensorRT-RTX has no build-time timing cache."""
    directory = cfg.timing_cache
    if not directory or is_rtx(trt) or not _have_gpu():
        return None
    import torch
    major, minor = torch.cuda.get_device_capability()
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-")
    path = Path(os.path.expanduser(directory)) / f"timing-{trt.__version__}-{gpu}-sm{major}{minor}.cache"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _load_timing_cache(config, path: Path):
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if cache is None and data:  # unreadable: start a new one
        cache = config.create_timing_cache(b"")
    if cache is not None and not config.set_timing_cache(cache, ignore_mismatch=False):
        cache = config.create_timing_cache(b"")  # made elsewhere after all: never mix device properties
        config.set_timing_cache(cache, ignore_mismatch=False)
    return cache
