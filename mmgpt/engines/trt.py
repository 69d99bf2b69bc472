"""One code path over `tensorrt` (datacenter GPUs) and `tensorrt_rtx` (RTX / Ampere-class GPUs; builds on a CPU)."""
from __future__ import annotations

import importlib
from types import ModuleType

RUNTIMES = ("tensorrt", "tensorrt_rtx")


class TensorRTUnavailable(RuntimeError):
    pass


def import_runtime(name: str = "auto") -> ModuleType:
    """`auto`: full TensorRT where installed, else TensorRT-RTX."""
    names = RUNTIMES if name == "auto" else (name,)
    if name not in ("auto", *RUNTIMES):
        raise ValueError(f"engine runtime {name!r}: choose auto, tensorrt, tensorrt_rtx or none")
    for n in names:
        try:
            return importlib.import_module(n)
        except ImportError:
            continue
    raise TensorRTUnavailable(
        f"no TensorRT module for engine runtime {name!r}: install `pip install tensorrt-cu13` (full TensorRT, "
        "H100 / H200 / B200) or `pip install tensorrt-rtx-cu13` (RTX / Ampere GPUs; builds on a CPU), or pass "
        "engine=none")


def runtime_name(trt: ModuleType) -> str:
    return trt.__name__.split(".")[0]


def is_rtx(trt: ModuleType) -> bool:
    return runtime_name(trt) == "tensorrt_rtx"


def dtype_name(dt) -> str:
    """trt.DataType.HALF -> 'half': how build records and inspection spell a tensor dtype."""
    return str(dt).split(".")[-1].lower()
