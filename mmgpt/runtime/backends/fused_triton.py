"""The PyTorch model's weights driven by mmgpt's fused Triton decode kernels (`torch-triton` backend).

Prefill runs the PyTorch model (one call per generation). Each decode step is 1 + 5 x n_layer + 1 kernel launches
(embedding; per layer LN1+QKV, attention with the KV write, c_proj+residual, LN2+c_fc+GELU, c_proj+residual; then
LN_f + head), all reading device-side positions, so the generator captures the step in one CUDA graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from mmgpt.kernels.decode_step import attention_kernel, embed_kernel, ln_gemv_kernel, ln_gemv_row_kernel
from mmgpt.model import MultimodalGPT
from mmgpt.runtime.backends.torch_model import TorchBackend

MAX_BATCH = 64


@dataclass(frozen=True)
class GemvConfig:
    """Tile sizes of ln_gemv: BLOCK_N output features per program (the grid is N / BLOCK_N), BLOCK_K per loop.
    Defaults from benchmarks/tune_triton.py on an H100 (benchmarks/NOTES.md)."""
    block_n: int = 32
    block_k: int = 256
    num_warps: int = 4
    min_programs: int = 0  # residual GEMVs split K until the grid has this many programs (0: 4 per SM)
    row_block_n: int = 16  # batch 1: the FMA kernel with this BLOCK_N (0: the tensor-core kernel, as for B > 1)
    row_num_warps: int = 8


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


class TritonBackend(TorchBackend):
    name = "torch-triton"

    def __init__(self, model: MultimodalGPT, prefix_len: int | None = None, gemv: GemvConfig = GemvConfig(),
                 head_gemv: GemvConfig = GemvConfig(block_n=64), block_s: int = 128, attn_num_warps: int = 8):
        super().__init__(model, compile=False, prefix_len=prefix_len)
        cfg = model.config
        if cfg.head_dim & (cfg.head_dim - 1):
            raise ValueError(f"the fused attention kernel needs a power-of-two head size, got {cfg.head_dim}")
        if not cfg.bias:
            raise ValueError("the fused kernels expect GPT-2's biases (model.bias=true)")
        if cfg.activation != "gelu_tanh":
            raise ValueError(f"the fused kernels compute GPT-2's tanh GELU, but this model uses {cfg.activation!r}; "
                             "use backend=torch")
        self.max_batch = MAX_BATCH
        self.gemv, self.head_gemv, self.block_s, self.attn_num_warps = gemv, head_gemv, block_s, attn_num_warps
        t = model.transformer
        self.layers = [_Layer(b.ln_1.weight, b.ln_1.bias, b.attn.c_attn.weight, b.attn.c_attn.bias,
                              b.attn.c_proj.weight, b.attn.c_proj.bias, b.ln_2.weight, b.ln_2.bias,
                              b.mlp.c_fc.weight, b.mlp.c_fc.bias, b.mlp.c_proj.weight, b.mlp.c_proj.bias)
                       for b in t.h]
        self.eps = t.ln_f.eps
        self._buffers: dict[int, tuple] = {}
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count if self.device.type == "cuda" else 1
        self.min_programs = gemv.min_programs or 4 * sms

    def _buffers_for(self, B: int):
        if B not in self._buffers:
            c, dev, dt = self.model.config, self.device, self.dtype
            self._buffers[B] = (torch.empty(B, c.n_embd, device=dev, dtype=torch.float32),  # residual stream
                                torch.empty(B, 3 * c.n_embd, device=dev, dtype=dt),  # q, k, v
                                torch.empty(B, c.n_embd, device=dev, dtype=dt),  # attention output
                                torch.empty(B, 4 * c.n_embd, device=dev, dtype=dt),  # MLP hidden
                                torch.empty(B, c.vocab_size, device=dev, dtype=torch.float32))  # logits
        return self._buffers[B]

    def _gemv(self, x, w, out, cfg: GemvConfig, ln=None, bias=None, gelu=False, residual=False):
        B, K = x.shape
        N = w.shape[0]
        block_b = max(16, triton.next_power_of_2(B))  # tl.dot needs 16 rows; padding rows are masked
        block_k = min(cfg.block_k, triton.next_power_of_2(K))
        row = B == 1 and cfg.row_block_n > 0
        block_n = cfg.row_block_n if row else cfg.block_n
        n_blocks, split = triton.cdiv(N, block_n), 1
        if residual:  # small N (c_proj: N = C) leaves SMs idle: split K, add the parts atomically into fp32 x
            while n_blocks * split < self.min_programs and 2 * split * block_k <= K:
                split *= 2
        ln_w, ln_b = ln if ln is not None else (w, w)  # unused pointers when HAS_LN is off
        if row:
            ln_gemv_row_kernel[(n_blocks, split)](
                x, ln_w, ln_b, w, bias if bias is not None else w, out, N, K=K, HAS_LN=ln is not None,
                HAS_BIAS=bias is not None, GELU=gelu, RESIDUAL=residual, EPS=self.eps, SPLIT_K=split,
                BLOCK_N=block_n, BLOCK_K=block_k, num_warps=cfg.row_num_warps)
            return
        ln_gemv_kernel[(n_blocks, split)](
            x, ln_w, ln_b, w, bias if bias is not None else w, out, B, N, K=K, HAS_LN=ln is not None,
            HAS_BIAS=bias is not None, GELU=gelu, RESIDUAL=residual, EPS=self.eps, SPLIT_K=split, BLOCK_B=block_b,
            BLOCK_N=cfg.block_n, BLOCK_K=block_k, num_warps=cfg.num_warps)

    def decode(self, input_ids, position_ids, k_cache, v_cache):
        B = input_ids.shape[0]
        if B > MAX_BATCH:
            raise ValueError(f"batch {B} exceeds the fused kernels' limit of {MAX_BATCH}; split the batch")
        c, t = self.model.config, self.model.transformer
        x, qkv, y, h, logits = self._buffers_for(B)
        tokens, positions = input_ids.reshape(B), position_ids.reshape(B)
        embed_kernel[(B,)](tokens, positions, t.wte.weight, t.wpe.weight, x, C=c.n_embd,
                           BLOCK_C=min(1024, triton.next_power_of_2(c.n_embd)))
        S, g = k_cache.shape[3], self.gemv
        for i, L in enumerate(self.layers):
            self._gemv(x, L.w_qkv, qkv, g, ln=(L.ln1_w, L.ln1_b), bias=L.b_qkv)
            attention_kernel[(B * c.n_head,)](qkv, k_cache[i], v_cache[i], positions, y, S, c.head_dim ** -0.5,
                                              H=c.n_head, D=c.head_dim, BLOCK_S=self.block_s,
                                              num_warps=self.attn_num_warps)
            self._gemv(y, L.w_o, x, g, bias=L.b_o, residual=True)
            self._gemv(x, L.w_fc, h, g, ln=(L.ln2_w, L.ln2_b), bias=L.b_fc, gelu=True)
            self._gemv(h, L.w_proj, x, g, bias=L.b_proj, residual=True)
        self._gemv(x, self.model.lm_head.weight, logits, self.head_gemv, ln=(t.ln_f.weight, t.ln_f.bias))
        return logits
