"""Backends: what runs the two flows of the exported model. Every backend is built from an artifacts directory
(`open_backend`), so artifacts copied to another machine serve on all of them.

    prefill(context {modality: features (B, P, F) | (ids (B, T_m), lengths (B,))}, input_ids (B, T),
        input_lengths (B,)) -> logits (B, V), keys / values per layer (B, H, N, D), N = the context's and the
        prompt's lengths, each row's real positions first
    decode(input_ids (B, 1), position_ids (B, 1), k_cache, v_cache) -> logits (B, V)
V and the ids are the decoded modality's.

The caches are (L, B, H, S, D) buffers owned by the generator; decode writes the new token's key and value into
them at position_ids (inside the backend, so a backend can fuse the write into its step).
"""
from __future__ import annotations

import os

import torch

from mmgpt.contract.artifacts import Artifacts
from mmgpt.contract.graphs import ModelDims
from mmgpt.errors import UserError

BACKENDS = ("auto", "tensorrt", "torch", "torch-triton", "torch-persistent", "onnxruntime")


class Backend:
    """What the generator needs to know of a backend, set once by every backend's constructor."""

    name = "backend"
    prefill_capturable = False  # prefill is pure device work of fixed shapes: the engine may capture it per bucket

    def __init__(self, dims: ModelDims, device, dtype: torch.dtype, context_lens: dict[str, int] | None = None,
                 max_batch: int | None = None):
        self.dims = dims
        self.device = torch.device(device)
        self.dtype = dtype  # of the KV cache
        self.context_lens = context_lens or {}  # continuous modality -> the only length this backend takes
        self.max_batch = max_batch  # the largest batch this backend takes (an engine profile's), or None

    def prefill(self, context, input_ids, input_lengths):
        raise NotImplementedError

    def decode(self, input_ids, position_ids, k_cache, v_cache) -> torch.Tensor:
        raise NotImplementedError


def write_kv(cache: torch.Tensor, new: list[torch.Tensor] | torch.Tensor, position_ids: torch.Tensor) -> None:
    """cache (L, B, H, S, D) <- new entries (L x (B, H, 1, D)) at each row's position (B, 1), in place."""
    new = torch.stack(list(new)) if not torch.is_tensor(new) else new  # (L, B, H, 1, D)
    L, B, H, _, D = new.shape
    index = position_ids.view(1, B, 1, 1, 1).expand(L, B, H, 1, D)
    cache.scatter_(3, index, new.to(cache.dtype))


def resolve_device(device: str) -> torch.device:
    """device=auto | cpu | cuda | cuda:N, checked against this machine before anything is loaded onto it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UserError(f"device={device!r}: use auto, cpu, cuda or cuda:<index>")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={device}: this machine (or this torch build, CUDA {torch.version.cuda}) has no "
                        "usable CUDA GPU; use device=cpu or device=auto")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise UserError(f"device={device}: there are only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def open_backend(name: str, artifacts: Artifacts, device: str = "auto", compile: bool = False,
                 strategy: str | None = None) -> Backend:
    """`auto`: TensorRT where an engine can run here, else the fused Triton kernels on a GPU (either family, where
    they cover the shapes; else the torch backend), else ONNX Runtime on the CPU. Returns the backend and, for auto,
    says why a preferred one was passed over."""
    if name not in BACKENDS:
        raise UserError(f"backend={name!r}: choose one of {BACKENDS}")
    dev = resolve_device(device)
    if name == "auto":
        if dev.type == "cuda" and artifacts.manifest.engines:
            try:
                return open_backend("tensorrt", artifacts, device, strategy=strategy)
            except Exception as e:  # noqa: BLE001 -- reported, then the next backend is tried
                print(f"backend=auto: the TensorRT engines cannot run here ({str(e).splitlines()[0][:200]}); "
                      "trying torch-triton")
        if dev.type != "cuda":
            return open_backend("onnxruntime", artifacts, device, compile)
        try:
            return open_backend("torch-triton", artifacts, device, compile)
        except UserError as e:  # a shape the fused kernels do not cover (a head size under 16, ...)
            print(f"backend=auto: the fused kernels cannot run this model ({e}); using torch")
            return open_backend("torch", artifacts, device, compile)
    if name == "tensorrt":
        from mmgpt.runtime.backends.tensorrt_engines import TensorRTBackend
        return TensorRTBackend(artifacts, strategy)
    if name == "onnxruntime":
        from mmgpt.runtime.backends.onnx_runtime import OnnxRuntimeBackend
        return OnnxRuntimeBackend(artifacts)
    model = artifacts.load_model(dev)
    context_lens = artifacts.manifest.context_lens
    if name == "torch-triton":
        if dev.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise UserError("backend=torch-triton needs a CUDA GPU (or TRITON_INTERPRET=1 to emulate it, slowly); "
                             "on a CPU use backend=torch or backend=onnxruntime")
        from mmgpt.runtime.backends.fused_triton import TritonBackend
        return TritonBackend(model, context_lens=context_lens)
    if name == "torch-persistent":
        from mmgpt.runtime.backends.persistent import PersistentBackend
        return PersistentBackend(model, context_lens=context_lens)
    from mmgpt.runtime.backends.torch_model import TorchBackend
    return TorchBackend(model, compile=compile, context_lens=context_lens)
