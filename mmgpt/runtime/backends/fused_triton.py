"""The PyTorch model's weights driven by mmgpt's fused Triton decode kernels (`torch-triton` backend).

Prefill runs the PyTorch model (one call per generation). Each decode step is 1 + 5 x n_layer + 1 kernel launches
(embedding; per layer LN1+QKV, attention with the KV write, c_proj+residual, LN2+c_fc+GELU, c_proj+residual; then
LN_f + head; the embedding and the head are the decoded modality's, so a new modality decodes as text does), all
reading device-side positions, so the generator captures the step in one CUDA graph. Any batch
runs: rows are tiled, and tiles are sized to fit the device's shared memory.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mmgpt.kernels.decode_step import attention_kernel, embed_kernel, ln_gemv_kernel, ln_gemv_row_kernel
from mmgpt.model import MultimodalGPT
from mmgpt.runtime.backends.torch_model import TorchBackend
from mmgpt.errors import UserError

HOPPER_SHARED_MEMORY = 232448  # bytes per program (opt-in); without a GPU, tiles are sized as for an H100


@dataclass(frozen=True)
class GemvConfig:
    """Tile sizes of ln_gemv. Defaults for batch <= 32 from benchmarks/tune_triton.py on an H100 (NOTES.md); the
    wide tiles keep every kernel of GPT-2 124M-1.5B free of register spills when compiled for sm_90."""
    block_n: int = 32  # output features per program (the grid is N / BLOCK_N)
    block_k: int = 256  # reduction slice per loop step
    num_warps: int = 4
    max_block_b: int = 64  # rows per program; a larger batch takes several row blocks
    # once the row block reaches max_block_b the GEMV is a GEMM: every program re-reads its rows' input tile, so
    # wider tiles read it fewer times, and more warps hold the larger tiles without spilling
    gemm_block_n: int = 128  # wider output tiles re-read each input tile fewer times (measured: NOTES.md)
    gemm_block_k: int = 64
    gemm_num_warps: int = 8
    num_stages: int = 3  # software-pipelining depth of the tensor-core kernel (sizes its shared memory)
    min_programs: int = 0  # residual GEMVs split K until the grid has this many programs (0: 4 per SM)
    row_block_n: int = 16  # batch 1: the FMA kernel with this BLOCK_N (0: the tensor-core kernel, as for B > 1)
    row_num_warps: int = 8


HEAD_GEMV = GemvConfig(block_n=64, gemm_block_n=128)  # the head's N is the vocabulary: wide tiles still fill the GPU


@dataclass(frozen=True)
class AttentionConfig:
    """Attention tiles: BLOCK_S cache slots per loop step (128 slots, 8 warps from the H100 sweep in NOTES.md)."""
    block_s: int = 128
    num_warps: int = 8
    min_programs: int = 0  # split the cache until rows x heads x splits reaches this (0: 2 per SM)
    max_splits: int = 16  # 1: one program per (row, head) walks the whole used cache


@dataclass
class _Layer:
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    w_qkv: torch.Tensor
    b_qkv: torch.Tensor
    w_o: torch.Tensor
    b_o: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    w_fc: torch.Tensor
    b_fc: torch.Tensor
    w_proj: torch.Tensor
    b_proj: torch.Tensor


@dataclass
class _StepBuffers:
    """Activations of one decode step for one batch size, allocated once (a captured graph keeps their addresses)."""
    x: torch.Tensor  # (B, C) fp32 residual stream
    qkv: torch.Tensor  # (B, 3C)
    y: torch.Tensor  # (B, C) attention output
    hidden: torch.Tensor  # (B, 4C) MLP hidden
    logits: torch.Tensor  # (B, V) fp32
    part_max: torch.Tensor  # (B * H * splits,) split attention partials, fp32
    part_sum: torch.Tensor  # (B * H * splits,)
    part_out: torch.Tensor  # (B * H * splits, D)
    arrivals: torch.Tensor  # (B * H,) int32 splits done per (row, head); the combining program resets it to 0


class TritonBackend(TorchBackend):
    name = "torch-triton"

    def __init__(self, model: MultimodalGPT, context_lens: dict[str, int] | None = None,
                 gemv: GemvConfig = GemvConfig(),
                 head_gemv: GemvConfig = HEAD_GEMV, attention: AttentionConfig = AttentionConfig(),
                 pdl: bool = False):
        """pdl: launch every kernel with programmatic dependent launch. Off by default: it did not gain across model
        sizes where it was measured (benchmarks/NOTES.md)."""
        super().__init__(model, compile=False, context_lens=context_lens)
        cfg = model.config
        if cfg.family != "gpt2":
            raise UserError(f"the fused kernels compute GPT-2's block; this is a {cfg.family}-family model: use "
                            "backend=torch (or tensorrt / onnxruntime)")
        if cfg.head_dim & (cfg.head_dim - 1):
            raise UserError(f"the fused attention kernel needs a power-of-two head size, got {cfg.head_dim}")
        if not cfg.bias:
            raise UserError("the fused kernels expect GPT-2's biases (model.bias=true)")
        if cfg.activation != "gelu_tanh":
            raise UserError(f"the fused kernels compute GPT-2's tanh GELU, but this model uses {cfg.activation!r}; "
                             "use backend=torch")
        self.gemv, self.head_gemv, self.attention = gemv, head_gemv, attention
        t = model.transformer
        self.layers = [_Layer(b.ln_1.weight, b.ln_1.bias, b.attn.c_attn.weight, b.attn.c_attn.bias,
                              b.attn.c_proj.weight, b.attn.c_proj.bias, b.ln_2.weight, b.ln_2.bias,
                              b.mlp.c_fc.weight, b.mlp.c_fc.bias, b.mlp.c_proj.weight, b.mlp.c_proj.bias)
                       for b in t.h]
        self.eps = t.ln_f.eps
        self._buffers: dict[int, _StepBuffers] = {}
        self._split_scratch: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            sms = props.multi_processor_count
            has_pdl = props.major >= 9 and hasattr(tl.extra.cuda, "gdc_wait")  # Hopper on, and a Triton that has it
            self.shared_memory = triton.runtime.driver.active.utils.get_device_properties(
                self.device.index or 0)["max_shared_mem"]
        else:
            sms, has_pdl, self.shared_memory = 1, False, HOPPER_SHARED_MEMORY
        if pdl and not has_pdl:
            raise UserError("programmatic dependent launch needs a CUDA GPU of compute capability 9.0 or later "
                             "and a Triton with tl.extra.cuda.gdc_wait; pass pdl=False")
        self.pdl = pdl
        # launch_pdl is only passed where used: a Triton without it rejects the option even when False
        self._launch = {"USE_PDL": True, "launch_pdl": True} if self.pdl else {"USE_PDL": False}
        self.min_programs = gemv.min_programs or 4 * sms
        self.attention_min_programs = attention.min_programs or 2 * sms

    def attention_splits(self, batch: int, capacity: int | None = None) -> int:
        """Programs per (row, head): enough for the grid to fill the GPU, at most one per BLOCK_S tile of the cache
        capacity, a power of two (1 at large batch, where rows x heads already fill it)."""
        a = self.attention
        n = min(a.max_splits, triton.cdiv(self.attention_min_programs, batch * self.model.config.n_head))
        if capacity is not None:
            n = min(n, triton.cdiv(capacity, a.block_s))
        return 1 << (max(n, 1).bit_length() - 1)

    def _buffers_for(self, B: int) -> _StepBuffers:
        if B not in self._buffers:
            c, dev, dt = self.model.config, self.device, self.dtype
            parts = B * c.n_head * self.attention_splits(B)  # the most any capacity needs

            def f32(*shape):
                return torch.empty(*shape, device=dev, dtype=torch.float32)
            self._buffers[B] = _StepBuffers(
                x=f32(B, c.n_embd), qkv=torch.empty(B, 3 * c.n_embd, device=dev, dtype=dt),
                y=torch.empty(B, c.n_embd, device=dev, dtype=dt),
                hidden=torch.empty(B, 4 * c.n_embd, device=dev, dtype=dt), logits=f32(B, self.dims.vocab_size),
                part_max=f32(parts), part_sum=f32(parts), part_out=f32(parts, c.head_dim),
                arrivals=torch.zeros(B * c.n_head, device=dev, dtype=torch.int32))
        return self._buffers[B]

    def _tiles(self, B: int, K: int, x_bytes: int, w_bytes: int, cfg: GemvConfig):
        """Tensor-core tile for B rows -> (BLOCK_B, BLOCK_N, BLOCK_K, warps). tl.dot needs 16 rows (padding rows
        are masked). BLOCK_K is halved while the pipelined input and weight tiles plus the fp32 accumulator would
        not fit the shared memory: an upper bound (Triton's sm_90 kernels use about half), kept 10% under it."""
        block_b = min(cfg.max_block_b, max(16, triton.next_power_of_2(B)))
        wide = block_b == cfg.max_block_b
        block_n = cfg.gemm_block_n if wide else cfg.block_n
        block_k = min(cfg.gemm_block_k if wide else cfg.block_k, triton.next_power_of_2(K))
        while (block_k > 16 and cfg.num_stages * block_k * (block_b * x_bytes + block_n * w_bytes)
               + 4 * block_b * block_n > 0.9 * self.shared_memory):
            block_k //= 2
        return block_b, block_n, block_k, cfg.gemm_num_warps if wide else cfg.num_warps

    def _gemv(self, x, w, out, cfg: GemvConfig, ln=None, bias=None, gelu=False, residual=False):
        B, K = x.shape
        N = w.shape[0]
        row = B == 1 and cfg.row_block_n > 0
        if row:
            block_b, block_n, warps = 1, cfg.row_block_n, cfg.row_num_warps
            block_k = min(cfg.block_k, triton.next_power_of_2(K))
        else:
            block_b, block_n, block_k, warps = self._tiles(B, K, x.element_size(), w.element_size(), cfg)
        row_blocks, n_blocks, split = triton.cdiv(B, block_b), triton.cdiv(N, block_n), 1
        if residual:  # small N (c_proj: N = C) leaves SMs idle: split K, the partials summed in order onto fp32 x
            while row_blocks * n_blocks * split < self.min_programs and 2 * split * block_k <= K:
                split *= 2
        ln_w, ln_b = ln if ln is not None else (w, w)  # unused pointers when HAS_LN is off
        part, arrivals = self._scratch(B, N, split, row_blocks * n_blocks) if split > 1 else (out, out)
        args = (x, ln_w, ln_b, w, bias if bias is not None else w, out, part, arrivals)
        meta = dict(K=K, HAS_LN=ln is not None, HAS_BIAS=bias is not None, GELU=gelu, RESIDUAL=residual, EPS=self.eps,
                    SPLIT_K=split, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, **self._launch)
        if row:
            ln_gemv_row_kernel[(n_blocks, split)](*args, N, **meta)
        else:
            ln_gemv_kernel[(row_blocks, n_blocks, split)](*args, B, N, BLOCK_B=block_b, num_stages=cfg.num_stages,
                                                         **meta)

    def _scratch(self, B: int, N: int, split: int, tiles: int):
        """Partials and arrival counters of a split-K launch, allocated once per shape (at the warm-up step, so
        a captured graph keeps their addresses); the kernel leaves the counters at zero."""
        key = (B, N, split)
        if key not in self._split_scratch:
            self._split_scratch[key] = (torch.empty(split * B * N, device=self.device, dtype=torch.float32),
                                        torch.zeros(tiles, device=self.device, dtype=torch.int32))
        return self._split_scratch[key]

    def decode(self, input_ids, position_ids, k_cache, v_cache):
        B = input_ids.shape[0]
        c, t, a = self.model.config, self.model.transformer, self.attention
        buf = self._buffers_for(B)
        tokens, positions = input_ids.reshape(B), position_ids.reshape(B)
        embed_kernel[(B,)](tokens, positions, self.model.table(c.decoded).weight, t.wpe.weight, buf.x, C=c.n_embd,
                           BLOCK_C=min(1024, triton.next_power_of_2(c.n_embd)), **self._launch)
        S, g = k_cache.shape[3], self.gemv
        splits = self.attention_splits(B, S)
        for i, L in enumerate(self.layers):
            self._gemv(buf.x, L.w_qkv, buf.qkv, g, ln=(L.ln1_w, L.ln1_b), bias=L.b_qkv)
            attention_kernel[(B * c.n_head, splits)](
                buf.qkv, k_cache[i], v_cache[i], positions, buf.y, buf.part_max, buf.part_sum, buf.part_out,
                buf.arrivals, S, c.head_dim ** -0.5, H=c.n_head, D=c.head_dim, BLOCK_S=a.block_s, NUM_SPLITS=splits,
                num_warps=a.num_warps, **self._launch)
            self._gemv(buf.y, L.w_o, buf.x, g, bias=L.b_o, residual=True)
            self._gemv(buf.x, L.w_fc, buf.hidden, g, ln=(L.ln2_w, L.ln2_b), bias=L.b_fc, gelu=True)
            self._gemv(buf.hidden, L.w_proj, buf.x, g, bias=L.b_proj, residual=True)
        head = self.model.head(c.decoded).weight
        self._gemv(buf.x, head, buf.logits, self.head_gemv, ln=(t.ln_f.weight, t.ln_f.bias))
        return buf.logits
