"""The fused decode step as one persistent CUDA kernel (`torch-persistent` backend): GPT-2 family, fp16, 1-8 rows.

One program per SM runs the work items of `mmgpt/kernels/persistent.py`'s table (`persistent_step.cu`, built with
the CUDA toolkit at first use and cached in torch's extensions directory). Prefill, and decode steps of more rows
than MAX_ROWS, run as `torch-triton` does. Weights, cache layout and device-side positions are `torch-triton`'s, so
the generator captures the step in its CUDA graph unchanged. The table and the step's buffers are made once per
(rows, cache capacity), at the generator's warm-up step, so a captured graph keeps their addresses.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

import mmgpt.kernels
from mmgpt.errors import UserError
from mmgpt.kernels.persistent import PART_PAD, WARPS, Schedule, build_schedule
from mmgpt.model import MultimodalGPT
from mmgpt.runtime.backends.fused_triton import TritonBackend

MAX_ROWS = 8  # the tensor-core tile's 8 columns hold the batch rows
SLOTS = 6  # ring slots per program: ~150 KB of weights in flight per SM at GPT-2 124M
MAX_EMBD = 2048  # a LayerNorm row in one warp's registers (the kernel's MAX_C4)
SOURCE = Path(mmgpt.kernels.__file__).with_name("persistent_step.cu")


@functools.cache
def extension():
    """The compiled kernel; a build failure is the user's to see, with the backend that needs no build."""
    from torch.utils.cpp_extension import load
    try:
        return load("mmgpt_persistent_step", [str(SOURCE)],
                    extra_cuda_cflags=["-O3", "-gencode=arch=compute_90,code=sm_90", "-std=c++17"])
    except Exception as e:  # noqa: BLE001 -- any build failure means the same thing to the user
        raise UserError(f"could not build the persistent decode kernel ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:300] if str(e) else ''}); it needs the CUDA toolkit (nvcc) and "
                        "ninja: use backend=torch-triton") from e


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
    ints: list[int]


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

    def _plan(self, B: int, S: int) -> _Plan | None:
        if (B, S) in self._plans:
            return self._plans[(B, S)]
        c, dev = self.model.config, self.device
        xs_stride = c.intermediate_size + 8  # the widest GEMV input, padded like the ring's rows
        xs_bytes = _round(B * xs_stride * 2)
        red_bytes = _round(4 * max(WARPS * 16 * 8, WARPS * (c.head_dim + PART_PAD)))
        slot_bytes = (self.smem_limit - xs_bytes - red_bytes - 8 * self.slots) // self.slots // 128 * 128
        smem = self.slots * slot_bytes + xs_bytes + red_bytes + 8 * self.slots
        if slot_bytes < 32 * 128 or self.ext.blocks_per_sm(smem) < 1:
            warnings.warn(f"the persistent decode kernel does not fit one program per SM ({smem} bytes of shared "
                          f"memory for {B} rows); this step runs torch-triton's kernels", RuntimeWarning)
            self._plans[(B, S)] = None
            return None
        s = build_schedule(c, B, self.n_programs, S, slot_bytes, self.splits)

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
                self.slots, slot_bytes, xs_stride, self.slots * slot_bytes, self.slots * slot_bytes + xs_bytes,
                self.slots * slot_bytes + xs_bytes + red_bytes, smem]
        plan = _Plan(s, s.items.to(dev), s.offsets.to(dev), torch.tensor(rows, dtype=torch.int64, device=dev),
                     buf(s.n_counters + 1, dtype=torch.int32), x, qkv, hidden, part, logits, ints)
        self._plans[(B, S)] = plan
        return plan

    def decode(self, input_ids, position_ids, k_cache, v_cache):
        B, S = input_ids.shape[0], k_cache.shape[3]
        plan = self._plan(B, S) if B <= MAX_ROWS else None
        if plan is None:
            return super().decode(input_ids, position_ids, k_cache, v_cache)
        if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            raise ValueError("the persistent decode kernel reads (L, B, H, S, D) caches in place: pass contiguous ones")
        c = self.model.config
        wte, wpe = self.model.table(c.decoded).weight, self.model.transformer.wpe.weight
        self.ext.step(plan.items, plan.offsets, plan.descs, plan.counters, input_ids.reshape(B).long(),
                      position_ids.reshape(B).long(), wte, wpe, plan.x, plan.qkv, k_cache, v_cache, plan.part,
                      plan.ints, self.eps, c.head_dim ** -0.5)
        return plan.logits


def _round(n: int, to: int = 128) -> int:
    return -(-n // to) * to


def _ptr(t: torch.Tensor | None) -> int:
    """A tensor's device address for the descriptors (0 for an absent bias or norm: the flags skip it)."""
    if t is None:
        return 0
    if not t.is_contiguous():
        raise ValueError("the persistent decode kernel reads weights in place: they must be contiguous")
    return t.data_ptr()

