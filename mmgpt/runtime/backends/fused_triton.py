"""The PyTorch model's weights driven by mmgpt's fused Triton decode kernels (`torch-triton` backend).

Prefill runs the PyTorch model (one call per generation). Each decode step is 1 + 5 x n_layer + 1 kernel launches
(embedding; per layer LN1+QKV, attention with the KV write, c_proj+residual, LN2+c_fc+GELU, c_proj+residual; then
LN_f + head; the embedding and the head are the decoded modality's, so a new modality decodes as text does), all
reading device-side positions, so the generator captures the step in one CUDA graph. Any batch
runs: rows are tiled, and tiles are sized to fit the device's shared memory.

A Llama-family model takes the same launches: the embedding without positions; RMSNorm+q/k/v (+ Qwen2's biases);
attention that rotates q and the new key by RoPE at each row's position (inverse frequencies computed once here)
and serves each key/value head's group of query heads; o_proj+residual; RMSNorm+gate/up+SwiGLU; down_proj+residual;
the final RMSNorm + head.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mmgpt.kernels.decode_step import attention_kernel, embed_kernel, ln_gemv_kernel, ln_gemv_row_kernel
from mmgpt.model import LlamaBlock, MultimodalGPT, rope_inv_freq
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
    row_max_k: int = 1024  # batch 1: a program's K slice up to this wide is one tile, all its loads in flight at once


HEAD_GEMV = GemvConfig(block_n=64, gemm_block_n=128)  # the head's N is the vocabulary: wide tiles still fill the GPU


@dataclass(frozen=True)
class AttentionConfig:
    """Attention tiles: BLOCK_S cache slots per loop step (at least 16: a tensor-core product's side)."""
    block_s: int = 128
    num_warps: int = 4
    min_programs: int = 0  # split the cache until rows x heads x splits reaches this (0: 2 per SM)
    max_splits: int = 16  # 1: one program per (row, head) walks the whole used cache
    num_stages: int = 3  # software-pipelining depth of the cache tiles' loads


@dataclass
class _Layer:
    """One block's weights as the kernels read them; None where the family has no such tensor."""
    ln1: tuple  # (weight, bias or None: RMSNorm)
    w_qkv: torch.Tensor  # (H D + 2 H_kv D, C): q, k, v rows
    b_qkv: torch.Tensor | None
    w_o: torch.Tensor
    b_o: torch.Tensor | None
    ln2: tuple
    w_fc: torch.Tensor  # gpt2: c_fc; llama: gate_proj
    w_up: torch.Tensor | None  # llama: up_proj, read beside gate_proj (SwiGLU)
    b_fc: torch.Tensor | None
    w_proj: torch.Tensor
    b_proj: torch.Tensor | None

    @classmethod
    def of(cls, block) -> "_Layer":
        if not isinstance(block, LlamaBlock):
            a, m = block.attn, block.mlp
            return cls((block.ln_1.weight, block.ln_1.bias), a.c_attn.weight, a.c_attn.bias, a.c_proj.weight,
                       a.c_proj.bias, (block.ln_2.weight, block.ln_2.bias), m.c_fc.weight, None, m.c_fc.bias,
                       m.c_proj.weight, m.c_proj.bias)
        a, m = block.self_attn, block.mlp
        projections = (a.q_proj, a.k_proj, a.v_proj)
        # q/k/v concatenated once (a copy of the attention's input weights, a small share of the model) so one
        # GEMV covers them; gate/up, the bulk of the weights, are read in place through two pointers instead
        w_qkv = torch.cat([p.weight.detach() for p in projections])
        b_qkv = torch.cat([p.bias.detach() for p in projections]) if a.q_proj.bias is not None else None
        return cls((block.input_layernorm.weight, None), w_qkv, b_qkv, a.o_proj.weight, None,
                   (block.post_attention_layernorm.weight, None), m.gate_proj.weight, m.up_proj.weight, None,
                   m.down_proj.weight, None)


@dataclass
class _StepBuffers:
    """Activations of one decode step for one batch size, allocated once (a captured graph keeps their addresses)."""
    x: torch.Tensor  # (B, C) fp32 residual stream
    qkv: torch.Tensor  # (B, (H + 2 H_kv) D)
    y: torch.Tensor  # (B, C) attention output
    hidden: torch.Tensor  # (B, intermediate_size) MLP hidden
    logits: torch.Tensor  # (B, V) fp32
    part_max: torch.Tensor  # (B * H_kv * splits * group,) split attention partials, fp32
    part_sum: torch.Tensor  # (B * H_kv * splits * group,)
    part_out: torch.Tensor  # (B * H_kv * splits * group, D)
    arrivals: torch.Tensor  # (B * H_kv,) int32 splits done per (row, kv head); the combiner resets it to 0


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
        if cfg.head_dim & (cfg.head_dim - 1) or cfg.head_dim < 16:
            raise UserError(f"the fused attention kernel needs a power-of-two head size of at least 16 (a "
                            f"tensor-core product's side), got {cfg.head_dim}; use backend=torch")
        self.llama = cfg.family == "llama"
        if not self.llama and not cfg.bias:
            raise UserError("the fused kernels expect GPT-2's biases (model.bias=true)")
        if not self.llama and cfg.activation != "gelu_tanh":
            raise UserError(f"the fused kernels compute GPT-2's tanh GELU, but this model uses {cfg.activation!r}; "
                             "use backend=torch")
        self.gemv, self.head_gemv, self.attention = gemv, head_gemv, attention
        self.layers = [_Layer.of(b) for b in model.blocks]
        norm = model.final_norm
        self.final_norm = (norm.weight, None if self.llama else norm.bias)
        self.eps = norm.eps
        # llama: RoPE's (D/2,) fp32 inverse frequencies, once; gpt2 passes a placeholder pointer (ROPE off)
        self.inv_freq = (rope_inv_freq(cfg, self.device) if self.llama
                         else torch.zeros(1, device=self.device, dtype=torch.float32))
        self.group = triton.next_power_of_2(cfg.n_head // cfg.n_kv_head)  # query heads per program, padded
        if attention.block_s < 16 or attention.block_s & (attention.block_s - 1):
            raise UserError(f"attention block_s must be a power of two of at least 16, got {attention.block_s}")
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
        """Programs per (row, key/value head): enough for the grid to fill the GPU, at most one per BLOCK_S tile of
        the cache capacity, a power of two (1 at large batch, where rows x heads already fill it)."""
        a = self.attention
        n = min(a.max_splits, triton.cdiv(self.attention_min_programs, batch * self.model.config.n_kv_head))
        if capacity is not None:
            n = min(n, triton.cdiv(capacity, a.block_s))
        return 1 << (max(n, 1).bit_length() - 1)

    def attention_stages(self, cache_bytes: int) -> int:
        """Pipelining depth of the attention's cache tiles: the configured one, less while a key and a value tile
        per stage would pass 90% of the shared memory (an upper bound; an fp32 cache of 128-wide heads needs it)."""
        tile = 2 * self.attention.block_s * self.model.config.head_dim * cache_bytes
        stages = self.attention.num_stages
        while stages > 1 and stages * tile > 0.9 * self.shared_memory:
            stages -= 1
        return stages

    def _buffers_for(self, B: int) -> _StepBuffers:
        if B not in self._buffers:
            c, dev, dt = self.model.config, self.device, self.dtype
            parts = B * c.n_kv_head * self.attention_splits(B) * self.group  # the most any capacity needs

            def f32(*shape):
                return torch.empty(*shape, device=dev, dtype=torch.float32)
            self._buffers[B] = _StepBuffers(
                x=f32(B, c.n_embd), qkv=torch.empty(B, (c.n_head + 2 * c.n_kv_head) * c.head_dim, device=dev,
                                                    dtype=dt),
                y=torch.empty(B, c.n_embd, device=dev, dtype=dt),
                hidden=torch.empty(B, c.intermediate_size, device=dev, dtype=dt), logits=f32(B, self.dims.vocab_size),
                part_max=f32(parts), part_sum=f32(parts), part_out=f32(parts, c.head_dim),
                arrivals=torch.zeros(B * c.n_kv_head, device=dev, dtype=torch.int32))
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

    def _gemv(self, x, w, out, cfg: GemvConfig, ln=None, bias=None, gelu=False, up=None, residual=False):
        """out (op)= act(norm(x) @ w^T + bias). ln: (weight, bias), bias None for RMSNorm; up: SwiGLU's up weight,
        act then silu(x w^T) * (x up^T)."""
        B, K = x.shape
        N = w.shape[0]
        row = B == 1 and cfg.row_block_n > 0
        if row:
            block_b, block_n, warps = 1, cfg.row_block_n, cfg.row_num_warps
            block_k = min(cfg.block_k, triton.next_power_of_2(K))
        else:
            weights = 2 if up is not None else 1  # SwiGLU pipelines a gate and an up tile
            block_b, block_n, block_k, warps = self._tiles(B, K, x.element_size(), weights * w.element_size(), cfg)
        row_blocks, n_blocks, split = triton.cdiv(B, block_b), triton.cdiv(N, block_n), 1
        if residual:  # small N (c_proj: N = C) leaves SMs idle: split K, the partials summed in order onto fp32 x
            while row_blocks * n_blocks * split < self.min_programs and 2 * split * block_k <= K:
                split *= 2
        if row and triton.next_power_of_2(triton.cdiv(K, split)) <= cfg.row_max_k:
            block_k = triton.next_power_of_2(triton.cdiv(K, split))  # the split's whole slice: one tile
        ln_w, ln_b = ln if ln is not None else (w, w)  # unused pointers when HAS_LN is off (or RMS for ln_b)
        part, arrivals = self._scratch(B, N, split, row_blocks * n_blocks) if split > 1 else (out, out)
        args = (x, ln_w, ln_b if ln_b is not None else ln_w, w, up if up is not None else w,
                bias if bias is not None else w, out, part, arrivals)
        meta = dict(K=K, HAS_LN=ln is not None, RMS=ln is not None and ln_b is None, HAS_BIAS=bias is not None,
                    GELU=gelu, GLU=up is not None, RESIDUAL=residual, EPS=self.eps, SPLIT_K=split, BLOCK_N=block_n,
                    BLOCK_K=block_k, num_warps=warps, **self._launch)
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
        c, a = self.model.config, self.attention
        buf = self._buffers_for(B)
        tokens, positions = input_ids.reshape(B), position_ids.reshape(B)
        table = self.model.table(c.decoded).weight
        embed_kernel[(B,)](tokens, positions, table, table if self.llama else self.model.transformer.wpe.weight,
                           buf.x, C=c.n_embd, BLOCK_C=min(1024, triton.next_power_of_2(c.n_embd)),
                           HAS_POS=not self.llama, **self._launch)
        S, g = k_cache.shape[3], self.gemv
        splits = self.attention_splits(B, S)
        stages = self.attention_stages(k_cache.element_size())
        for i, L in enumerate(self.layers):
            self._gemv(buf.x, L.w_qkv, buf.qkv, g, ln=L.ln1, bias=L.b_qkv)
            attention_kernel[(B * c.n_kv_head, splits)](
                buf.qkv, k_cache[i], v_cache[i], positions, self.inv_freq, buf.y, buf.part_max, buf.part_sum,
                buf.part_out, buf.arrivals, S, c.head_dim ** -0.5, H=c.n_head, H_KV=c.n_kv_head, D=c.head_dim,
                GROUP=self.group, ROWS=max(16, self.group), BLOCK_S=a.block_s, NUM_SPLITS=splits, ROPE=self.llama,
                IEEE=k_cache.dtype == torch.float32, num_warps=a.num_warps, num_stages=stages, **self._launch)
            self._gemv(buf.y, L.w_o, buf.x, g, bias=L.b_o, residual=True)
            self._gemv(buf.x, L.w_fc, buf.hidden, g, ln=L.ln2, bias=L.b_fc, gelu=not self.llama, up=L.w_up)
            self._gemv(buf.hidden, L.w_proj, buf.x, g, bias=L.b_proj, residual=True)
        head = self.model.head(c.decoded).weight
        self._gemv(buf.x, head, buf.logits, self.head_gemv, ln=self.final_norm)
        return buf.logits
