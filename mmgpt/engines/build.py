"""ONNX graphs -> TensorRT engines, in one of two strategies (DESIGN.md "Engines"):

  two_engines  prefill.engine (prefill.onnx) + decode.engine (decode.onnx): the weights are stored twice.
  shared       shared.engine from context_generation.onnx with two optimization profiles -- context (past length
               0) and generation (prefix length 0, one token) -- over one copy of the weights. This is the answer
               to TensorRT-LLM issue #51: one engine, two flows.

Networks are strongly typed: precision comes from the ONNX dtypes, never from builder flags.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from mmgpt.engines.trt import TensorRTUnavailable, dtype_name, import_runtime, is_rtx, runtime_name
from mmgpt.engines.session import sidecar
from mmgpt.export.artifacts import Artifacts, write_json_atomic
from mmgpt.export.graphs import past_names

STRATEGIES = ("two_engines", "shared")


class EngineBuildError(RuntimeError):
    pass


def profile_shapes(meta: dict, cfg: dict) -> dict[str, dict[str, dict[str, tuple]]]:
    """Per engine, per profile, per input: (min, opt, max) shapes, from the engine config and the exported limits."""
    mc, limits = meta["model_config"], meta["limits"]
    L, H, D, F = mc["n_layer"], mc["n_head"], mc["n_embd"] // mc["n_head"], mc["prefix_dim"]
    P = meta["prefix_len"]
    b = _clip(cfg["profiles"]["batch"], 1, limits["max_batch"], "profiles.batch")
    t = _clip(cfg["profiles"]["prompt"], 1, limits["max_text"], "profiles.prompt")
    # capacities are clipped to the model's positions, so one default serves every model size
    s = _clip([min(int(x), limits["max_cache"]) for x in cfg["profiles"]["capacity"]], 1, limits["max_cache"],
              "profiles.capacity")

    def shapes(**dims):  # dims: name -> (min, opt, max) per symbolic dim
        return lambda *axes: tuple(tuple(dims[a][i] if isinstance(a, str) else a for a in axes) for i in range(3))

    def past(dim_of_cache):
        return dict.fromkeys(past_names(L), dim_of_cache)

    ctx = shapes(B=b, P=(P, P, P), T=t, S=(0, 0, 0))
    gen = shapes(B=b, P=(0, 0, 0), T=(1, 1, 1), S=s)
    prefill = {"prefix": ctx("B", "P", F), "input_ids": ctx("B", "T"), "input_lengths": ctx("B")}
    decode = {"input_ids": gen("B", 1), "position_ids": gen("B", 1), **past(gen("B", H, "S", D))}
    return {
        "two_engines": {"prefill": {"context": prefill}, "decode": {"generation": decode}},
        "shared": {"shared": {
            "context": {**prefill, "position_ids": ctx("B", 1), **past(ctx("B", H, "S", D))},
            "generation": {"prefix": gen("B", "P", F), "input_ids": gen("B", "T"), "input_lengths": gen("B"),
                           **decode}}},
    }


def _clip(mom, lo, hi, what):
    mom = tuple(int(x) for x in mom)
    if len(mom) != 3 or not mom[0] <= mom[1] <= mom[2]:
        raise ValueError(f"engine.{what}={list(mom)} must be [min, opt, max] with min <= opt <= max")
    if mom[0] < lo or mom[2] > hi:
        raise ValueError(f"engine.{what}={list(mom)} must lie within [{lo}, {hi}], the range exported into the "
                         "ONNX graphs (raise export limits.* to widen it)")
    return mom


SOURCES = {"prefill": "prefill", "decode": "decode", "shared": "context_generation"}


def build_engines(artifacts: Artifacts, cfg: dict) -> dict:
    """Build the configured strategy's engines into the artifacts directory and record them in model.json.
    Returns the model.json `engines` entry. `runtime: auto` without any TensorRT module installed skips."""
    strategy = cfg.get("strategy", "two_engines")
    if strategy not in STRATEGIES:
        raise ValueError(f"engine.strategy={strategy!r}: choose two_engines or shared")
    try:
        trt = import_runtime(cfg.get("runtime", "auto"))
    except TensorRTUnavailable as e:
        if cfg.get("runtime", "auto") == "auto":
            print(f"engines: skipped ({str(e).split(':')[0]}; install tensorrt-cu13 or tensorrt-rtx-cu13)")
            return {}
        raise
    meta = artifacts.meta
    plans = profile_shapes(meta, cfg)[strategy]
    logger = trt.Logger(trt.Logger.WARNING)
    cache_path = Path(os.path.expanduser(cfg["timing_cache"])) if cfg.get("timing_cache") else None
    built = {}
    for engine_name, profiles in plans.items():
        t0 = time.perf_counter()
        onnx_path = artifacts.graph_path(SOURCES[engine_name])
        plan, network_io = _build_one(trt, logger, onnx_path, profiles, cfg, cache_path)
        out = artifacts.path / f"{engine_name}.engine"
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_bytes(plan)
        os.replace(tmp, out)
        record = {"weights_sha256": meta["weights_sha256"], "runtime": runtime_name(trt), "version": trt.__version__,
                  "strategy": strategy, "io": network_io,
                  "profiles": {p: {k: [list(s) for s in v] for k, v in shapes.items()} for p, shapes in profiles.items()}}
        write_json_atomic(sidecar(out), record)  # the session refuses an engine whose weights differ from model.json
        built[engine_name] = {"file": out.name, "bytes": out.stat().st_size, "source": onnx_path.name,
                              "io": network_io, "profiles": record["profiles"],
                              "build_s": round(time.perf_counter() - t0, 2)}
        print(f"  {out.name:<15} {out.stat().st_size / 2**20:8.2f} MiB  profiles {list(profiles)}  "
              f"({built[engine_name]['build_s']:.1f}s, {runtime_name(trt)} {trt.__version__})")
    entry = {"runtime": runtime_name(trt), "version": trt.__version__, "strategy": strategy,
             "weights_sha256": meta["weights_sha256"], "engines": built,
             "total_bytes": sum(e["bytes"] for e in built.values()),
             "settings": {k: cfg[k] for k in ("workspace_mib", "optimization_level", "compute_capability")}}
    engines = dict(meta.get("engines") or {})
    engines[strategy] = entry
    artifacts.update_meta(engines=engines)
    return entry


def _build_one(trt, logger, onnx_path: Path, profiles: dict, cfg: dict, cache_path: Path | None):
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from file: external weights resolve beside it
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT's ONNX parser rejected {onnx_path.name}:\n{errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(cfg["workspace_mib"]) << 20)
    config.builder_optimization_level = int(cfg["optimization_level"])
    if is_rtx(trt):
        cc = str(cfg.get("compute_capability", "auto"))
        target = _rtx_target(trt, cc)
        config.num_compute_capabilities = 1
        config.set_compute_capability(target, 0)
    # TensorRT-RTX compiles kernels when the engine loads, so a build-time timing cache means nothing to it
    cache = None if is_rtx(trt) else _load_timing_cache(config, cache_path)
    for name, shapes in profiles.items():
        profile = builder.create_optimization_profile()
        for tensor, (lo, opt, hi) in shapes.items():
            profile.set_shape(tensor, lo, opt, hi)
        if config.add_optimization_profile(profile) < 0:
            raise EngineBuildError(f"{onnx_path.name}: profile '{name}' was rejected: {shapes}")
    io = {}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        io[t.name] = {"mode": "input", "dtype": dtype_name(t.dtype), "shape": list(t.shape)}
    for i in range(network.num_outputs):
        t = network.get_output(i)
        io[t.name] = {"mode": "output", "dtype": dtype_name(t.dtype), "shape": list(t.shape)}
    missing = set().union(*[set(s) for s in profiles.values()]) - {k for k, v in io.items() if v["mode"] == "input"}
    if missing:
        raise EngineBuildError(f"{onnx_path.name}: profile names inputs the network lacks: {sorted(missing)}")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"building an engine from {onnx_path.name} failed; the TensorRT log above says why")
    if cache is not None and cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_name(f".{cache_path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(memoryview(cache.serialize()))
        os.replace(tmp, cache_path)
    return bytes(memoryview(plan)), io


def _rtx_target(trt, cc: str):
    if cc == "auto":
        try:
            import torch
            if torch.cuda.is_available():
                return trt.ComputeCapability.CURRENT
        except ImportError:
            pass
        raise EngineBuildError("engine.compute_capability=auto needs a GPU to read; on a CPU-only machine name the "
                               "target GPU, e.g. engine.compute_capability=SM89 (Ada) or SM86 / SM80 / SM120")
    try:
        return getattr(trt.ComputeCapability, cc.upper())
    except AttributeError:
        options = [n for n in dir(trt.ComputeCapability) if n.startswith("SM") or n == "CURRENT"]
        raise EngineBuildError(f"engine.compute_capability={cc!r}: TensorRT-RTX knows {options}") from None


def _load_timing_cache(config, cache_path: Path | None):
    data = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    cache = config.create_timing_cache(data)
    if cache is None and data:  # an unreadable cache (other version) is rebuilt, not fatal
        cache = config.create_timing_cache(b"")
    if cache is not None:
        config.set_timing_cache(cache, ignore_mismatch=True)
    return cache
