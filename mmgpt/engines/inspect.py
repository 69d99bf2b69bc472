"""Engine inspection: I/O tensor names, dtypes, per-profile (min, opt, max) shapes, and size.

Read from the deserialized engine where an installed runtime can load it here; otherwise (a CPU-only machine, or
an engine for another GPU) from the build record written beside it, which holds what the builder was given.
"""
from __future__ import annotations

import json
from pathlib import Path

from mmgpt.engines.session import sidecar


def inspect_engine(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such engine; `python export.py` writes them into artifacts/<name>/")
    out = {"file": str(path), "bytes": path.stat().st_size}
    side = sidecar(path)
    record = json.loads(side.read_text()) if side.is_file() else None
    loaded = _from_engine(path, record["runtime"] if record else "auto")
    if loaded is not None:
        out.update(loaded, source="engine")
    elif record is not None:
        out.update(source="build record (no runtime here can load the engine)", runtime=record["runtime"],
                   version=record["version"], io=record["io"], profiles=record["profiles"])
    else:
        raise RuntimeError(f"{path}: cannot be loaded here and has no build record {side.name}")
    return out


def _from_engine(path: Path, runtime: str) -> dict | None:
    try:
        import torch
        if not torch.cuda.is_available():
            return None
        from mmgpt.engines.trt import dtype_name, import_runtime
        trt = import_runtime(runtime)
        engine = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(path.read_bytes())
    except Exception:  # noqa: BLE001 -- falls back to the build record, which says so
        return None
    if engine is None:
        return None
    io, profiles = {}, {}
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    for n in names:
        mode = "input" if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT else "output"
        io[n] = {"mode": mode, "dtype": dtype_name(engine.get_tensor_dtype(n)),
                 "shape": list(engine.get_tensor_shape(n))}
    for p in range(engine.num_optimization_profiles):
        profiles[str(p)] = {n: [list(s) for s in engine.get_tensor_profile_shape(n, p)]
                            for n in names if io[n]["mode"] == "input"}
    return {"runtime": trt.__name__, "version": trt.__version__, "io": io, "profiles": profiles}


def format_inspection(info: dict) -> str:
    lines = [f"{info['file']}  {info['bytes'] / 2**20:.2f} MiB  ({info['runtime']} {info['version']}; "
             f"read from the {info['source']})", "I/O:"]
    for name, t in info["io"].items():
        lines.append(f"  {t['mode']:<6} {name:<28} {t['dtype']:<8} {t['shape']}")
    for profile, shapes in info["profiles"].items():
        lines.append(f"profile {profile}:")
        for name, (lo, opt, hi) in shapes.items():
            lines.append(f"  {name:<28} min {lo}  opt {opt}  max {hi}")
    return "\n".join(lines)


def print_inspection(path) -> None:
    print(format_inspection(inspect_engine(path)))
