"""Triton kernels for one decode token: five launches per layer instead of ~20, for both decoder families.

At small batch a decode step is memory- and launch-bound: every weight is read once and each op is a tiny kernel.
These kernels fuse what the step does between weight reads:

  ln_gemv       [LayerNorm | RMSNorm] -> x @ W^T + b -> [GELU | SwiGLU] -> store, or add into the fp32 residual
                stream. GPT-2: QKV with LN1; c_fc with LN2 + GELU; both c_proj with the residual add; the head with
                LN_f. Llama: q/k/v (one weight, optional biases) with RMSNorm; gate and up in one launch (two weight
                pointers, silu(gate) * up in the epilogue) with RMSNorm; o_proj and down_proj with the residual add;
                the head with the final RMSNorm.
  attention     writes the new key / value into the cache at each row's position, then attends over the *used*
                part of the cache only (online softmax up to the position), so cost follows the sequence, not the
                capacity bucket; the used part is split across programs (flash-decoding) when rows x heads alone
                would leave the GPU idle. One program serves a key/value head and its group of query heads
                (grouped-query attention), so each cache head is read once per group; with ROPE it rotates q and
                the new key to the row's position first (the cache holds rotated keys).

The residual stream stays in fp32 between kernels. With USE_PDL (programmatic dependent launch, Hopper and later)
a kernel may start while its predecessor finishes. Each kernel lets its own successor launch only after its
`gdc_wait` returned, so when a kernel starts, every kernel but its predecessor has finished: before waiting it may
read what earlier kernels and steps wrote (positions, the cache below the position), and it prefetches into L2 the
weights and cache lines it is about to read, so their DRAM reads overlap the predecessor's tail.
The kernels run on CUDA, and on a CPU under TRITON_INTERPRET=1 (without PDL), which is how the test suite checks
them against the PyTorch model.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _gelu_tanh(x):
    inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return 0.5 * x * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))  # tanh(z) = 2 sigmoid(2z) - 1


@triton.jit
def _wait_for_predecessor(USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()  # the previous kernel's writes are visible from here on
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _prefetch_rows_to_l2(base_ptr, offs_row, mask_row, row_stride, lo, hi, BLOCK: tl.constexpr):
    """Ask L2 for columns [lo, hi) of the rows `offs_row` (row-major, `row_stride` elements apart), one request per
    128-byte line, without waiting for them. Masked lanes ask again for the base line, which is harmless."""
    LINE: tl.constexpr = 1024 // base_ptr.dtype.element_ty.primitive_bitwidth  # elements per 128-byte line
    LINES: tl.constexpr = (BLOCK + LINE - 1) // LINE
    for c0 in range(lo, hi, BLOCK):
        offs = c0 + tl.arange(0, LINES) * LINE
        ptrs = base_ptr + offs_row[:, None] * row_stride + offs[None, :]
        ptrs = tl.where(mask_row[:, None] & (offs[None, :] < hi), ptrs, base_ptr)
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def _prefetch_weights_then_wait(w_ptr, w_up_ptr, offs_n, mask_n, K, k_lo, k_hi, GLU: tl.constexpr,
                                USE_PDL: tl.constexpr, BLOCK_K: tl.constexpr):
    """With PDL, ask L2 for this program's weight rows before waiting on the previous kernel (weights are never
    written during a step), then wait."""
    if USE_PDL:
        _prefetch_rows_to_l2(w_ptr, offs_n, mask_n, K, k_lo, k_hi, BLOCK_K)
        if GLU:
            _prefetch_rows_to_l2(w_up_ptr, offs_n, mask_n, K, k_lo, k_hi, BLOCK_K)
    _wait_for_predecessor(USE_PDL)


@triton.jit
def _input_tile(x_ptr, offs, mask, ln_w_ptr, ln_b_ptr, offs_k, mask_k, mean, rstd, HAS_LN: tl.constexpr,
                RMS: tl.constexpr):
    """A tile of the input rows in fp32, normalised when HAS_LN (mean and rstd broadcast against it): LayerNorm, or
    with RMS Hugging Face's RMSNorm, whose normalised value is rounded to the weight's dtype before the scale."""
    xk = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g, be = _norm_weights(ln_w_ptr, ln_b_ptr, offs_k, mask_k, HAS_LN, RMS)
    return _normalise(xk, g, be, mean, rstd, ln_w_ptr, HAS_LN, RMS)


@triton.jit
def _norm_weights(ln_w_ptr, ln_b_ptr, offs_k, mask_k, HAS_LN: tl.constexpr, RMS: tl.constexpr):
    """The norm's scale and shift over offs_k, fp32 (placeholders without HAS_LN; the shift is the scale for RMS)."""
    g = 0.0
    be = 0.0
    if HAS_LN:
        g = tl.load(ln_w_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        be = g
        if not RMS:
            be = tl.load(ln_b_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    return g, be


@triton.jit
def _normalise(xk, g, be, mean, rstd, ln_w_ptr, HAS_LN: tl.constexpr, RMS: tl.constexpr):
    """`_input_tile` on a tile and norm weights already loaded (fp32); ln_w_ptr gives RMSNorm's rounding dtype."""
    if HAS_LN:
        if RMS:
            xk = (xk * rstd).to(ln_w_ptr.dtype.element_ty).to(tl.float32) * g
        else:
            xk = (xk - mean) * rstd * g + be
    return xk


@triton.jit
def _rstd(s1, s2, K: tl.constexpr, EPS: tl.constexpr, RMS: tl.constexpr):
    """(mean, 1 / std) from the sums of x and x^2 over K features; RMSNorm's mean square is not centred."""
    mean = s1 / K
    var = s2 / K
    if not RMS:
        var -= mean * mean
    return mean, 1.0 / tl.sqrt(var + EPS)


@triton.jit
def _epilogue(acc, acc_up, bias_ptr, offs_n, mask_n, pid_k, HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
              GLU: tl.constexpr):
    """+ bias (by split 0 only), then GELU, or SwiGLU's silu(gate) * up."""
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if GELU:
        acc = _gelu_tanh(acc)
    if GLU:
        acc = acc * tl.sigmoid(acc) * acc_up
    return acc


@triton.jit
def embed_kernel(tok_ptr, pos_ptr, wte_ptr, wpe_ptr, x_ptr, C: tl.constexpr, BLOCK_C: tl.constexpr,
                 HAS_POS: tl.constexpr, USE_PDL: tl.constexpr):
    """x[b] = wte[token[b]] (+ wpe[position[b]] with HAS_POS: learned positions) (fp32)."""
    b = tl.program_id(0)
    _wait_for_predecessor(USE_PDL)
    tok = tl.load(tok_ptr + b)
    pos = tl.load(pos_ptr + b)
    for c0 in tl.static_range(0, C, BLOCK_C):
        offs = c0 + tl.arange(0, BLOCK_C)
        m = offs < C
        e = tl.load(wte_ptr + tok * C + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_POS:
            e += tl.load(wpe_ptr + pos * C + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(x_ptr + b * C + offs, e, mask=m)


@triton.jit
def ln_gemv_kernel(x_ptr, ln_w_ptr, ln_b_ptr, w_ptr, w_up_ptr, bias_ptr, out_ptr, part_ptr, arrivals_ptr, B, N,
                   K: tl.constexpr, HAS_LN: tl.constexpr, RMS: tl.constexpr, HAS_BIAS: tl.constexpr,
                   GELU: tl.constexpr, GLU: tl.constexpr, RESIDUAL: tl.constexpr, EPS: tl.constexpr,
                   SPLIT_K: tl.constexpr, USE_PDL: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """out[b, n] (op)= act(sum_k LN(x[b])[k] * W[n, k] + bias[n]) for a block of BLOCK_B rows, so each weight tile
    is read once per row block. x (B, K) any float; W (N, K) row-major (nn.Linear layout). With GLU, act is
    silu(x W^T) * (x W_up^T): SwiGLU's gate and up read in place through two pointers, no concatenated copy.

    Grid (row blocks, N / BLOCK_N, SPLIT_K). Row blocks vary fastest, so the programs that share a weight tile run
    together and all but the first read it from L2. SPLIT_K > 1 (residual only): program (., n, s) sums its
    K / SPLIT_K slice -- parallelism for small N without a reduction kernel; see `_reduce_splits`."""
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    K_PER: tl.constexpr = ((K + SPLIT_K * BLOCK_K - 1) // (SPLIT_K * BLOCK_K)) * BLOCK_K  # whole tiles per split
    k_lo = pid_k * K_PER
    k_hi = tl.minimum(k_lo + K_PER, K)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_b = offs_b < B
    mask_n = offs_n < N
    _prefetch_weights_then_wait(w_ptr, w_up_ptr, offs_n, mask_n, K, k_lo, k_hi, GLU, USE_PDL, BLOCK_K)
    mean = 0.0
    rstd = 1.0
    if HAS_LN:  # row statistics: x is a few KiB per row, re-read from L2 by every program
        s1 = tl.zeros((BLOCK_B,), dtype=tl.float32)
        s2 = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_s = k0 + tl.arange(0, BLOCK_K)
            xs = tl.load(x_ptr + offs_b[:, None] * K + offs_s[None, :],
                         mask=mask_b[:, None] & (offs_s[None, :] < K), other=0.0).to(tl.float32)
            s1 += tl.sum(xs, axis=1)
            s2 += tl.sum(xs * xs, axis=1)
        mean, rstd = _rstd(s1, s2, K, EPS, RMS)
        mean = mean[:, None]
        rstd = rstd[:, None]
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros_like(acc)  # SwiGLU's up projection (GLU only)
    for k0 in range(k_lo, k_hi, BLOCK_K):  # a loop: K reaches 6400
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K  # splits hold whole tiles: only the last tile of K is partial (constexpr: fewer regs)
        xk = _input_tile(x_ptr, offs_b[:, None] * K + offs_k[None, :], mask_b[:, None] & mask_k[None, :],
                         ln_w_ptr, ln_b_ptr, offs_k, mask_k, mean, rstd, HAS_LN, RMS)
        w_offs = offs_n[:, None] * K + offs_k[None, :]
        w = tl.load(w_ptr + w_offs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc += tl.dot(xk.to(w.dtype), tl.trans(w))  # (B, K) x (K, N) on the tensor cores, fp32 accumulate
        if GLU:
            w_up = tl.load(w_up_ptr + w_offs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            acc_up += tl.dot(xk.to(w_up.dtype), tl.trans(w_up))
    acc = _epilogue(acc, acc_up, bias_ptr, offs_n[None, :], mask_n[None, :], pid_k, HAS_BIAS, GELU, GLU)
    offsets = offs_b[:, None] * N + offs_n[None, :]
    mask = mask_b[:, None] & mask_n[None, :]
    if SPLIT_K > 1:
        tile = pid_b * tl.num_programs(1) + pid_n
        _reduce_splits(acc, out_ptr, part_ptr, arrivals_ptr, tile, offsets, mask, B * N, pid_k, SPLIT_K)
    else:
        if RESIDUAL:
            acc += tl.load(out_ptr + offsets, mask=mask, other=0.0)
        tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _reduce_splits(acc, out_ptr, part_ptr, arrivals_ptr, tile, offsets, mask, size, split, SPLIT_K: tl.constexpr):
    """Split-K, deterministically: every split stores its partial sum; the last split of the output tile to arrive
    adds the partials in split order onto the fp32 residual stream (which holds the residual) and resets the
    arrival counter for the next launch. Atomic float adds would finish in a different order on every run, so
    greedy tokens could change between a CUDA graph's replays."""
    tl.store(part_ptr + split * size + offsets, acc, mask=mask)
    tl.debug_barrier()  # every thread's share of the partial is written before the arrival is counted
    arrived = tl.atomic_add(arrivals_ptr + tile, 1, sem="acq_rel", scope="gpu")
    if arrived == SPLIT_K - 1:
        total = tl.load(out_ptr + offsets, mask=mask, other=0.0, cache_modifier=".cg")
        for s in tl.static_range(SPLIT_K):  # .cg: the other programs' partials from L2, never a stale L1 line
            total += tl.load(part_ptr + s * size + offsets, mask=mask, other=0.0, cache_modifier=".cg")
        tl.store(out_ptr + offsets, total, mask=mask)
        tl.store(arrivals_ptr + tile, 0)


@triton.jit
def _row_tiles(x_ptr, ln_w_ptr, ln_b_ptr, w_ptr, w_up_ptr, offs_n, mask_n, k_lo, k_hi, K: tl.constexpr,
               HAS_LN: tl.constexpr, RMS: tl.constexpr, GLU: tl.constexpr, EPS: tl.constexpr, USE_PDL: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The row kernel's K slice [k_lo, k_hi) tile by tile: (BLOCK_N, BLOCK_K) partial products of gate (and up)."""
    _prefetch_weights_then_wait(w_ptr, w_up_ptr, offs_n, mask_n, K, k_lo, k_hi, GLU, USE_PDL, BLOCK_K)
    mean = 0.0
    rstd = 1.0
    if HAS_LN:
        s1 = tl.zeros((BLOCK_K,), dtype=tl.float32)
        s2 = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in tl.static_range(0, K, BLOCK_K):  # unrolled: the row's loads all in flight at once
            offs_s = k0 + tl.arange(0, BLOCK_K)
            xs = tl.load(x_ptr + offs_s, mask=offs_s < K, other=0.0).to(tl.float32)
            s1 += xs
            s2 += xs * xs
        mean, rstd = _rstd(tl.sum(s1, axis=0), tl.sum(s2, axis=0), K, EPS, RMS)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_up = tl.zeros_like(acc)  # SwiGLU's up projection (GLU only)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        xk = _input_tile(x_ptr, offs_k, mask_k, ln_w_ptr, ln_b_ptr, offs_k, mask_k, mean, rstd, HAS_LN, RMS)
        w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :],
                    other=0.0).to(tl.float32)
        acc += w * xk[None, :]
        if GLU:
            w_up = tl.load(w_up_ptr + offs_n[:, None] * K + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :],
                           other=0.0).to(tl.float32)
            acc_up += w_up * xk[None, :]
    return acc, acc_up


@triton.jit
def ln_gemv_row_kernel(x_ptr, ln_w_ptr, ln_b_ptr, w_ptr, w_up_ptr, bias_ptr, out_ptr, part_ptr, arrivals_ptr, N,
                       K: tl.constexpr, HAS_LN: tl.constexpr, RMS: tl.constexpr, HAS_BIAS: tl.constexpr,
                       GELU: tl.constexpr, GLU: tl.constexpr, RESIDUAL: tl.constexpr, EPS: tl.constexpr,
                       SPLIT_K: tl.constexpr, USE_PDL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """ln_gemv_kernel for one row (batch 1): plain FMAs, no tensor-core padding to 16 rows, so BLOCK_N can be small
    and the grid large.

    At batch 1 a program's time is its chain of memory round trips, not its bytes, so where a program's K slice is
    one tile (K_PER == BLOCK_K, which the host picks up to a width) its weights are loaded first and the input row
    read once for both the norm's statistics and the product: every load is in flight at once. Otherwise the slice
    is walked tile by tile into a (BLOCK_N, BLOCK_K) accumulator, reduced once at the end."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    K_PER: tl.constexpr = ((K + SPLIT_K * BLOCK_K - 1) // (SPLIT_K * BLOCK_K)) * BLOCK_K
    k_lo = pid_k * K_PER
    k_hi = tl.minimum(k_lo + K_PER, K)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    if K_PER == BLOCK_K:
        offs_k = k_lo + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_hi
        w_offs = offs_n[:, None] * K + offs_k[None, :]
        w_mask = mask_n[:, None] & mask_k[None, :]
        w = tl.load(w_ptr + w_offs, mask=w_mask, other=0.0)  # weights are never written during a step
        w_up = w
        if GLU:
            w_up = tl.load(w_up_ptr + w_offs, mask=w_mask, other=0.0)
        g, be = _norm_weights(ln_w_ptr, ln_b_ptr, offs_k, mask_k, HAS_LN, RMS)
        _wait_for_predecessor(USE_PDL)
        xk = tl.load(x_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        mean = 0.0
        rstd = 1.0
        if HAS_LN:  # only unsplit launches normalise, so this tile is the whole row
            mean, rstd = _rstd(tl.sum(xk, axis=0), tl.sum(xk * xk, axis=0), K, EPS, RMS)
        xk = _normalise(xk, g, be, mean, rstd, ln_w_ptr, HAS_LN, RMS)
        acc = w.to(tl.float32) * xk[None, :]
        acc_up = w_up.to(tl.float32) * xk[None, :]
    else:
        acc, acc_up = _row_tiles(x_ptr, ln_w_ptr, ln_b_ptr, w_ptr, w_up_ptr, offs_n, mask_n, k_lo, k_hi, K, HAS_LN,
                                 RMS, GLU, EPS, USE_PDL, BLOCK_N, BLOCK_K)
    out = _epilogue(tl.sum(acc, axis=1), tl.sum(acc_up, axis=1), bias_ptr, offs_n, mask_n, pid_k, HAS_BIAS, GELU,
                    GLU)  # (BLOCK_N,)
    if SPLIT_K > 1:
        _reduce_splits(out, out_ptr, part_ptr, arrivals_ptr, pid, offs_n, mask_n, N, pid_k, SPLIT_K)
    else:
        if RESIDUAL:
            out += tl.load(out_ptr + offs_n, mask=mask_n, other=0.0)
        tl.store(out_ptr + offs_n, out.to(out_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _rope(x, x_pair, cos, sin_signed):
    """Rotate-half RoPE: x * cos + (-x2, x1) * sin, with x_pair = (x2, x1) loaded by the caller."""
    return x * cos + x_pair * sin_signed


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b on the tensor cores with fp32 accumulation; IEEE: exact fp32 products (an fp32 cache), not TF32."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def attention_kernel(qkv_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, inv_freq_ptr, y_ptr, part_max_ptr, part_sum_ptr,
                     part_out_ptr, arrivals_ptr, S, scale, H: tl.constexpr, H_KV: tl.constexpr, D: tl.constexpr,
                     GROUP: tl.constexpr, ROWS: tl.constexpr, BLOCK_S: tl.constexpr, NUM_SPLITS: tl.constexpr,
                     ROPE: tl.constexpr, IEEE: tl.constexpr, USE_PDL: tl.constexpr):
    """softmax(q K^T) V for one (row, key/value head) and its H / H_KV query heads over cache slots [0, position)
    plus the new token, reading only those slots; the new key / value is stored at the row's position (by split 0,
    exactly once; no program reads that slot). qkv (B, (H + 2 H_KV) D): q heads, then k, then v; caches
    (B, H_KV, S, D); y (B, H D). GROUP: H / H_KV rounded up to a power of two (padding heads are masked); ROWS: the
    group padded to the 16 rows a tensor-core product needs. With ROPE q and the new key are rotated to the row's
    position by inv_freq (D/2,) fp32, cos and sin rounded to the model's dtype as the PyTorch model rounds them.

    Both products run on the tensor cores, q (ROWS, D) against each (BLOCK_S, D) tile of keys, then the
    probabilities against the tile of values, in the cache's dtype with fp32 accumulation as flash attention does
    (IEEE: exact fp32 products for an fp32 cache, not TF32): the whole group in one product, and a loop of two dots
    that Triton software-pipelines, so the loads of the next tile overlap this one's arithmetic.

    Grid (B * H_KV, NUM_SPLITS), NUM_SPLITS a power of two. Split j walks the j-th of NUM_SPLITS equal runs of
    BLOCK_S-slot tiles below the position (the runs follow the position on the device, so the grid stays fixed for
    a CUDA graph) and keeps a partial (running max, sum of exponentials, weighted sum of values) per query head in
    fp32. The last split of a (row, key/value head) to arrive combines the partials and resets the arrival counter
    for the next launch: no separate combine kernel, whose launch would cost about what the split saves at batch 1."""
    pid = tl.program_id(0)  # row * H_KV + key/value head
    split = tl.program_id(1)
    b = pid // H_KV
    kv = pid % H_KV
    offs_d = tl.arange(0, D)
    offs_r = tl.arange(0, ROWS)
    mask_r = offs_r < H // H_KV
    heads = kv * (H // H_KV) + offs_r  # (ROWS,) the query heads this key/value head serves
    pos = tl.load(pos_ptr + b)  # written before the step began
    base = (b * H_KV + kv).to(tl.int64) * S * D  # a layer's cache may pass 2**31 elements at large batch
    run = tl.cdiv(tl.cdiv(pos, BLOCK_S), NUM_SPLITS) * BLOCK_S
    lo = split * run
    hi = tl.minimum(lo + run, pos)
    if USE_PDL:  # slots below the position were written by earlier steps: one contiguous range per cache
        one = tl.arange(0, 1)
        _prefetch_rows_to_l2(k_cache_ptr + base, one, one < 1, 0, lo * D, hi * D, BLOCK_S * D)
        _prefetch_rows_to_l2(v_cache_ptr + base, one, one < 1, 0, lo * D, hi * D, BLOCK_S * D)
    _wait_for_predecessor(USE_PDL)
    row = qkv_ptr + b * (H + 2 * H_KV) * D
    q_offs = heads[:, None] * D + offs_d[None, :]  # (ROWS, D)
    k_row = row + (H + kv) * D
    v_row = row + (H + H_KV + kv) * D
    q = tl.load(row + q_offs, mask=mask_r[:, None], other=0.0).to(tl.float32)
    k_new = tl.load(k_row + offs_d)
    v_new = tl.load(v_row + offs_d)
    if ROPE:
        pair = (offs_d + D // 2) % D  # rotate-half's partner of each feature
        angle = pos.to(tl.float32) * tl.load(inv_freq_ptr + offs_d % (D // 2))
        cos = tl.cos(angle).to(k_new.dtype).to(tl.float32)
        sin = tl.where(offs_d < D // 2, -1.0, 1.0) * tl.sin(angle).to(k_new.dtype).to(tl.float32)
        q_pair = tl.load(row + heads[:, None] * D + pair[None, :], mask=mask_r[:, None], other=0.0)
        q = _rope(q, q_pair.to(tl.float32), cos[None, :], sin[None, :])
        k_new = _rope(k_new.to(tl.float32), tl.load(k_row + pair).to(tl.float32), cos, sin).to(k_new.dtype)
    q_dot = q.to(k_cache_ptr.dtype.element_ty)  # the rotated q as the model holds it, in the cache's dtype
    q = q_dot.to(tl.float32)
    first = split == 0
    # online softmax per query head; split 0 is seeded with the new token's own score, the others start empty
    m = tl.where(first, tl.sum(q * k_new.to(tl.float32)[None, :], axis=1) * scale, float("-inf"))  # (ROWS,)
    l_sum = tl.where(first, 1.0, 0.0) + tl.zeros((ROWS,), dtype=tl.float32)
    acc = tl.where(first, v_new.to(tl.float32)[None, :], 0.0) + tl.zeros((ROWS, D), dtype=tl.float32)
    for s0 in range(lo, hi, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask_s = offs_s < hi
        kv_off = base + offs_s[:, None] * D + offs_d[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=mask_s[:, None], other=0.0)
        v = tl.load(v_cache_ptr + kv_off, mask=mask_s[:, None], other=0.0)
        scores = _dot(q_dot, tl.trans(k), IEEE) * scale  # (ROWS, BLOCK_S)
        scores = tl.where(mask_s[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))  # finite: the tile holds at least one slot
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m = m_new
    # the new key / value is stored after the walk: a store before it would hold the tiles' loads behind RoPE
    # (the compiler cannot move a load above a store to the same cache), and no program reads this slot
    store_new = offs_d + split * D < D  # split 0 only (a lane-wise form: the interpreter rejects `& first`)
    tl.store(k_cache_ptr + base + pos * D + offs_d, k_new.to(k_cache_ptr.dtype.element_ty), mask=store_new)
    tl.store(v_cache_ptr + base + pos * D + offs_d, v_new.to(v_cache_ptr.dtype.element_ty), mask=store_new)
    if NUM_SPLITS == 1:
        tl.store(y_ptr + b * H * D + q_offs, (acc / l_sum[:, None]).to(y_ptr.dtype.element_ty), mask=mask_r[:, None])
    else:
        slot = (pid * NUM_SPLITS + split) * GROUP + offs_r  # (ROWS,): the group's own rows of the partials
        keep = offs_r < GROUP
        tl.store(part_max_ptr + slot, m, mask=keep)
        tl.store(part_sum_ptr + slot, l_sum, mask=keep)
        tl.store(part_out_ptr + slot[:, None] * D + offs_d[None, :], acc, mask=keep[:, None])
        tl.debug_barrier()  # every thread's share of the partial is written before the arrival is counted
        arrived = tl.atomic_add(arrivals_ptr + pid, 1, sem="acq_rel", scope="gpu")
        if arrived == NUM_SPLITS - 1:
            # one (GROUP, D) partial per split, unrolled so that every load is in flight at once; .cg: the other
            # programs' partials from L2, never from a stale L1 line
            offs_g = tl.arange(0, GROUP)
            first_part = pid * NUM_SPLITS * GROUP + offs_g
            m_all = tl.full((GROUP,), float("-inf"), tl.float32)
            for j in tl.static_range(NUM_SPLITS):
                m_all = tl.maximum(m_all, tl.load(part_max_ptr + first_part + j * GROUP, cache_modifier=".cg"))
            num = tl.zeros((GROUP, D), dtype=tl.float32)
            den = tl.zeros((GROUP,), dtype=tl.float32)
            for j in tl.static_range(NUM_SPLITS):
                part = first_part + j * GROUP
                # empty splits (max -inf) weigh 0
                weight = tl.exp(tl.load(part_max_ptr + part, cache_modifier=".cg") - m_all)
                den += weight * tl.load(part_sum_ptr + part, cache_modifier=".cg")
                num += weight[:, None] * tl.load(part_out_ptr + part[:, None] * D + offs_d[None, :],
                                                 cache_modifier=".cg")
            y = num / den[:, None]
            out = y_ptr + b * H * D + (kv * (H // H_KV) + offs_g)[:, None] * D + offs_d[None, :]
            tl.store(out, y.to(y_ptr.dtype.element_ty), mask=(offs_g < H // H_KV)[:, None])
            tl.store(arrivals_ptr + pid, 0)
