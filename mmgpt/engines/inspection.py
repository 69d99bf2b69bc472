"""Engine inspection: I/O tensor names, dtypes, per-profile (min, opt, max) shapes, and size.

Read from the deserialized engine where an installed runtime can load it here; otherwise (a CPU-only machine, or an
engine for another GPU) from its build record in the model.json beside it, which holds what the builder was given.
Profiles are named the same way on both paths (TensorRT numbers them; the build record says which number is which).
"""
from __future__ import annotations

from pathlib import Path

from mmgpt.contract.engines import EngineBuild, EngineFile
from mmgpt.contract.manifest import MANIFEST_FILE, ArtifactsError, Manifest
from mmgpt.engines.trt import dtype_name, import_runtime
from mmgpt.errors import UserError


def engine_record(path: Path) -> tuple[EngineBuild, EngineFile] | None:
    """The build record of the engine at `path`, from the manifest of its artifacts directory, or None."""
    if not (path.parent / MANIFEST_FILE).is_file():
        return None
    try:
        manifest = Manifest.read(path.parent)
    except ArtifactsError:
        return None
    return next(((b, e) for b in manifest.engines.values() for e in b.engines.values() if e.file == path.name), None)


def inspect_engine(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such engine; `python export.py` builds them into artifacts/<name>/")
    out = {"file": str(path), "bytes": path.stat().st_size}
    record = engine_record(path)
    loaded = _from_engine(path, record)
    if loaded is not None:
        out.update(loaded, source="engine")
    elif record is not None:
        build, engine = record
        out.update(source="build record (no runtime here can load the engine)", runtime=build.runtime,
                   version=build.version, io=engine.io, profiles=engine.profiles,
                   builder_weights_bytes=engine.builder_weights_bytes)
    else:
        raise UserError(f"{path}: cannot be loaded here, and the {MANIFEST_FILE} beside it records no such engine; "
                        "inspect it on the GPU that built it, or rebuild it with `python export.py artifacts=<dir> "
                        "engine=...`")
    return out


def _from_engine(path: Path, record: tuple[EngineBuild, EngineFile] | None) -> dict | None:
    try:
        import torch
        if not torch.cuda.is_available():
            return None
        trt = import_runtime(record[0].runtime if record else "auto")
        engine = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(path.read_bytes())
    except Exception:  # noqa: BLE001 -- falls back to the build record, which says so
        return None
    if engine is None:
        return None
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    io = {n: {"mode": "input" if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT else "output",
              "dtype": dtype_name(engine.get_tensor_dtype(n)), "shape": list(engine.get_tensor_shape(n))}
          for n in names}
    profile_names = record[1].profile_names if record else []
    profiles = {}
    for p in range(engine.num_optimization_profiles):
        key = profile_names[p] if p < len(profile_names) else str(p)
        profiles[key] = {n: [list(s) for s in engine.get_tensor_profile_shape(n, p)]
                         for n in names if io[n]["mode"] == "input"}
    weights = None
    if hasattr(trt, "EngineStat"):
        weights = int(engine.get_engine_stat(trt.EngineStat.TOTAL_WEIGHTS_SIZE))
    return {"runtime": trt.__name__, "version": trt.__version__, "io": io, "profiles": profiles,
            "builder_weights_bytes": weights}


def format_inspection(info: dict) -> str:
    weights = info.get("builder_weights_bytes")
    lines = [f"{info['file']}  {info['bytes'] / 2**20:.2f} MiB"
             + (f" (weights {weights / 2**20:.2f} MiB)" if weights else "")
             + f"  ({info['runtime']} {info['version']}; read from the {info['source']})", "I/O:"]
    for name, t in info["io"].items():
        lines.append(f"  {t['mode']:<6} {name:<28} {t['dtype']:<8} {t['shape']}")
    for profile, shapes in info["profiles"].items():
        lines.append(f"profile {profile}:")
        for name, (lo, opt, hi) in shapes.items():
            lines.append(f"  {name:<28} min {lo}  opt {opt}  max {hi}")
    return "\n".join(lines)
