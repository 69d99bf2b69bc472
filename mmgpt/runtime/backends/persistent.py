"""The fused decode step as one persistent CUDA kernel (`torch-persistent` backend): GPT-2 family, fp16, 1-8 rows.

One program per SM runs the work items of `mmgpt/kernels/persistent.py`'s table (`persistent_step.cu`, built with
the CUDA toolkit at first use and cached in torch's extensions directory). Prefill, and decode steps of more rows
than MAX_ROWS, run as `torch-triton` does. Weights, cache layout and device-side positions are `torch-triton`'s, so
the generator captures the step in its CUDA graph unchanged. The table and the step's buffers are made once per
(rows, cache capacity), at the generator's warm-up step, so a captured graph keeps their addresses.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.cpp_extension import CUDA_HOME, get_default_build_root

import mmgpt.kernels
from mmgpt.errors import UserError
from mmgpt.kernels.persistent import PART_PAD, Schedule, plan_step
from mmgpt.model import MultimodalGPT
from mmgpt.runtime.backends.fused_triton import TritonBackend

MAX_ROWS = 8  # the tensor-core tile's 8 columns hold the batch rows
SLOTS = 6  # ring slots per program: ~150 KB of weights in flight per SM at GPT-2 124M
MAX_EMBD = 1664  # a LayerNorm row in one warp's registers (the kernel's MAX_C4)
SOURCE = Path(mmgpt.kernels.__file__).with_name("persistent_step.cu")


@functools.cache
def extension() -> ctypes.CDLL:
    """The compiled kernel, built once per source version into torch's extensions directory with nvcc; a failed
    build is the user's to see, with the backend that needs none."""
    source = SOURCE.read_bytes()
    lib = Path(get_default_build_root()) / f"mmgpt_persistent_{hashlib.sha256(source).hexdigest()[:16]}.so"
    if not lib.exists():
        nvcc = shutil.which("nvcc") or (CUDA_HOME and str(Path(CUDA_HOME) / "bin" / "nvcc"))
        if not nvcc or not Path(nvcc).exists():
            raise UserError("the persistent decode kernel is built at first use with nvcc, which is not on PATH "
                            "(or under CUDA_HOME): install the CUDA toolkit, or use backend=torch-triton")
        lib.parent.mkdir(parents=True, exist_ok=True)
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        build = subprocess.run([nvcc, "-O3", "-std=c++17", "-gencode=arch=compute_90,code=sm_90", "-Xcompiler",
                                "-fPIC", "-shared", "-o", str(tmp), str(SOURCE)], capture_output=True, text=True)
        if build.returncode != 0:
            raise UserError(f"could not build the persistent decode kernel with {nvcc}:\n{build.stderr[-2000:]}\n"
                            "use backend=torch-triton")
        os.replace(tmp, lib)  # atomic: a concurrent first use never loads a half-written library
    dll = ctypes.CDLL(str(lib))
    dll.mmgpt_persistent_step.argtypes = [ctypes.POINTER(ctypes.c_longlong), ctypes.POINTER(ctypes.c_int),
                                          ctypes.c_float, ctypes.c_float, ctypes.c_void_p]
    dll.mmgpt_error_string.restype = ctypes.c_char_p
    return dll


def _check(dll: ctypes.CDLL, code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"persistent decode kernel, {what}: CUDA error {code} "
                           f"({dll.mmgpt_error_string(code).decode()})")


@dataclass
class _Plan:
    """A schedule on the device with the step's buffers (their addresses are in the descriptors)."""
    schedule: Schedule
    items: torch.Tensor
    offsets: torch.Tensor
    descs: torch.Tensor
    counters: torch.Tensor
    x: torch.Tensor
    qkv: torch.Tensor
    hidden: torch.Tensor
    part: torch.Tensor
    logits: torch.Tensor
    ints: ctypes.Array  # the kernel's int parameters (mmgpt_persistent_step)


class PersistentBackend(TritonBackend):
    name = "torch-persistent"

    def __init__(self, model: MultimodalGPT, context_lens: dict[str, int] | None = None, slots: int = SLOTS,
                 splits: int | None = None):
        """slots: ring slots per program; splits: attention items per (row, head) (None: from the batch)."""
        super().__init__(model, context_lens=context_lens)
        c = model.config
        if self.llama:
            raise UserError("the persistent decode kernel covers the GPT-2 family; use backend=torch-triton")
        if self.dtype != torch.float16:
            raise UserError(f"the persistent decode kernel runs fp16 weights, not {self.dtype}; use "
                            "backend=torch-triton")
        if c.head_dim % 32 or c.head_dim > 128 or c.n_embd % 16 or c.n_embd > MAX_EMBD:
            raise UserError(f"the persistent decode kernel needs a head size that is a multiple of 32 up to 128 and "
                            f"n_embd a multiple of 16 up to {MAX_EMBD}, got {c.head_dim} and {c.n_embd}; use "
                            "backend=torch-triton")
        if self.device.type != "cuda" or torch.cuda.get_device_capability(self.device) < (9, 0):
            raise UserError("the persistent decode kernel needs a CUDA GPU of compute capability 9.0 or later "
                            "(Hopper's bulk copies); use backend=torch-triton")
        self.ext = extension()
        props = torch.cuda.get_device_properties(self.device)
        self.n_programs = props.multi_processor_count
        self.smem_limit = props.shared_memory_per_block_optin
        self.slots, self.splits = slots, splits
        self._plans: dict[tuple[int, int], _Plan | None] = {}

    def plan(self, B: int, S: int) -> _Plan | None:
        """The schedule and buffers of a step of B rows over a cache of capacity S (None: torch-triton runs it)."""
        if (B, S) in self._plans:
            return self._plans[(B, S)]
        c, dev = self.model.config, self.device
        planned = plan_step(c, B, self.n_programs, S, self.smem_limit, self.slots, self.splits)
        blocks = 0
        if planned is not None:
            blocks = self.ext.mmgpt_blocks_per_sm(planned[1].total, self.device.index or 0)
            _check(self.ext, max(0, -blocks), "occupancy")
        if blocks < 1:
            warnings.warn(f"the persistent decode kernel does not fit one program per SM at {B} rows "
                          f"({self.smem_limit} bytes of shared memory); this step runs torch-triton's kernels",
                          RuntimeWarning)
            self._plans[(B, S)] = None
            return None
        s, lay = planned

        def buf(*shape, dtype=torch.float32):
            return torch.zeros(*shape, device=dev, dtype=dtype)
        x, qkv, hidden = buf(B, c.n_embd), buf(B, 3 * c.n_embd, dtype=self.dtype), buf(B, c.intermediate_size,
                                                                                        dtype=self.dtype)
        part, logits = buf(B * c.n_head * s.splits * (c.head_dim + PART_PAD)), buf(B, self.dims.vocab_size)
        head = self.model.head(c.decoded).weight
        rows = []
        for d in s.descs:
            L = self.layers[d.layer] if d.layer >= 0 else None
            w, bias, ln, inp, out = {
                "qkv": lambda: (L.w_qkv, L.b_qkv, L.ln1, x, qkv), "attn_out": lambda: (L.w_o, L.b_o, None, part, x),
                "fc": lambda: (L.w_fc, L.b_fc, L.ln2, x, hidden), "proj": lambda: (L.w_proj, L.b_proj, None, hidden, x),
                "head": lambda: (head, None, self.final_norm, x, logits)}[d.name]()
            ln_w, ln_b = ln if ln is not None else (None, None)
            rows.append([_ptr(w), _ptr(bias), _ptr(ln_w), _ptr(ln_b), _ptr(inp), _ptr(out), d.N, d.K, d.chunk_cols,
                         d.tile_rows, d.flags, 0])
        ints = [self.n_programs, s.n_counters, B, c.n_embd, c.n_head, c.head_dim, S, s.splits, s.chunk_positions,
                lay.slots, lay.slot_bytes, lay.xs_stride, lay.xs_off, lay.red_off, lay.bar_off, lay.total,
                self.device.index or 0, lay.items_off, lay.tables_off, len(s.descs)]
        plan = _Plan(s, s.items.to(dev), s.offsets.to(dev), torch.tensor(rows, dtype=torch.int64, device=dev),
                     buf(s.n_counters + 1, dtype=torch.int32), x, qkv, hidden, part, logits,
                     (ctypes.c_int * len(ints))(*ints))
        self._plans[(B, S)] = plan
        return plan

    def decode(self, input_ids, position_ids, k_cache, v_cache):
        B, S = input_ids.shape[0], k_cache.shape[3]
        plan = self.plan(B, S) if B <= MAX_ROWS else None
        if plan is None:
            return super().decode(input_ids, position_ids, k_cache, v_cache)
        if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            raise ValueError("the persistent decode kernel reads (L, B, H, S, D) caches in place: pass contiguous ones")
        c = self.model.config
        tensors = (plan.items, plan.offsets, plan.descs, plan.counters, input_ids.reshape(B).long(),
                   position_ids.reshape(B).long(), self.model.table(c.decoded).weight,
                   self.model.transformer.wpe.weight, plan.x, plan.qkv, k_cache, v_cache, plan.part)
        ptrs = (ctypes.c_longlong * len(tensors))(*(t.data_ptr() for t in tensors))
        stream = torch.cuda.current_stream(self.device).cuda_stream
        _check(self.ext, self.ext.mmgpt_persistent_step(ptrs, plan.ints, self.eps, c.head_dim ** -0.5, stream),
               "launch")
        return plan.logits


def _ptr(t: torch.Tensor | None) -> int:
    """A tensor's device address for the descriptors (0 for an absent bias or norm: the flags skip it)."""
    if t is None:
        return 0
    if not t.is_contiguous():
        raise ValueError("the persistent decode kernel reads weights in place: they must be contiguous")
    return t.data_ptr()

