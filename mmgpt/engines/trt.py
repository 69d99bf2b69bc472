"""One code path over `tensorrt` (datacenter GPUs) and `tensorrt_rtx` (RTX / Ampere-class GPUs; builds on a CPU):
importing either, its logger, and the names both the builder and the runtime use."""
from __future__ import annotations

import importlib
from types import ModuleType

from mmgpt.errors import UserError

RUNTIMES = ("tensorrt", "tensorrt_rtx")

# TensorRT warns about every int64 input of a strongly typed network ("Make sure input ... has Int64 binding");
# mmgpt's graphs declare int64 ids on purpose and bind int64 tensors, so the line says nothing to act on.
_EXPECTED_WARNINGS = ("has Int64 binding",)


class TensorRTUnavailable(UserError, RuntimeError):
    pass


class EngineError(UserError, RuntimeError):
    """An engine cannot be built, loaded or run; the message carries TensorRT's own error lines."""


def import_runtime(name: str = "auto") -> ModuleType:
    """`auto`: full TensorRT where installed, else TensorRT-RTX."""
    if name not in ("auto", *RUNTIMES):
        raise UserError(f"engine runtime {name!r}: choose auto, tensorrt, tensorrt_rtx or none")
    for n in RUNTIMES if name == "auto" else (name,):
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


class TrtLog:
    """A TensorRT logger that keeps what was said, so every error raised can carry TensorRT's own lines.
    Warnings and errors are printed as they come (minus the ones listed above); INFO lines are only kept."""

    def __init__(self, trt: ModuleType, echo=True):
        self.errors: list[str] = []
        self.info: list[str] = []
        severity = trt.ILogger.Severity
        outer = self

        class Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)

            def log(self, level, msg):
                if level <= severity.ERROR:
                    outer.errors.append(msg)
                if level <= severity.WARNING and echo and not any(w in msg for w in _EXPECTED_WARNINGS):
                    print(f"[{runtime_name(trt)}] {msg}")
                elif level == severity.INFO:
                    outer.info.append(msg)
        self.logger = Logger()  # TensorRT holds only a reference: keep it alive with this object

    def take_errors(self) -> str:
        """The error lines since the last call, joined; empties the list."""
        text = " | ".join(self.errors[-5:])
        self.errors.clear()
        return text
