// The whole GPT-2 decode step (batch 1-8, fp16) as one persistent kernel: one program per SM interprets the work
// items of mmgpt/kernels/persistent.py (its docstring describes the table). Built at first use by
// torch.utils.cpp_extension (mmgpt/runtime/backends/persistent.py).
//
// Each program streams the weight tiles (and attention's cache ranges) of its items through a ring of shared-memory
// slots with bulk copies (cp.async.bulk, completing on one mbarrier per slot). A slot is refilled with the next
// chunk of the program's list as soon as it is consumed, before that chunk's item waits on its stage counter: the
// weights never depend on the step's activations, so they are in flight while the program waits, and only the
// activations (a few KB, from L2) are read after the wait. GEMV tiles run on the tensor cores (mma.m16n8k16, the
// batch rows as the 8 columns), every weight tile read once for all rows. Reductions run in a fixed order: the
// logits of one step do not depend on timing, so a CUDA graph's replays agree.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>

namespace {

constexpr int THREADS = 512;
constexpr int WARPS = THREADS / 32;
constexpr int MAX_C4 = 13;  // float4 per lane of a LayerNorm row: n_embd <= 1664 (GPT-2 1.5B: 1600)
constexpr int MAX_DPL = 4;  // head dims per lane: head_dim <= 128
constexpr int ITEM_FIELDS = 8;
constexpr int DESC_FIELDS = 12;
constexpr int PART_PAD = 4;
constexpr int MAX_SPLITS = 8;  // attention splits of a (row, head): their partials are combined in registers
enum { EMBED = 0, GEMV = 1, ATTN = 2 };
enum { LN = 1, BIAS = 2, GELU = 4, RESIDUAL = 8, IN_COMBINE = 16, IN_F16 = 32, OUT_F32 = 64 };

struct Params {
  const int* items;
  const int* offsets;
  const long long* descs;
  int* counters;  // one per stage, then the exit counter
  const long long* tokens;
  const long long* positions;
  const __half* wte;
  const __half* wpe;
  float* x;  // (B, C) residual stream
  const __half* qkv;  // (B, 3C)
  __half* k_cache;  // (L, B, H, S, D)
  __half* v_cache;
  float* part;  // (B, H, splits, D + PART_PAD): acc[D], max, sum
  int n_counters, B, C, H, D, S, splits, chunk_positions;
  int slots, slot_bytes, xs_stride, xs_off, red_off, bar_off, items_off, tables_off, n_desc;
  float eps, scale;
};

struct Desc {
  const __half* w;
  const __half* bias;
  const __half* ln_w;
  const __half* ln_b;
  const void* in;
  void* out;
  int N, K, chunk_cols, tile_rows, flags;
};

__device__ __forceinline__ Desc load_desc(const long long* d) {
  Desc r;
  r.w = reinterpret_cast<const __half*>(__ldg(d));
  r.bias = reinterpret_cast<const __half*>(__ldg(d + 1));
  r.ln_w = reinterpret_cast<const __half*>(__ldg(d + 2));
  r.ln_b = reinterpret_cast<const __half*>(__ldg(d + 3));
  r.in = reinterpret_cast<const void*>(__ldg(d + 4));
  r.out = reinterpret_cast<void*>(__ldg(d + 5));
  r.N = static_cast<int>(__ldg(d + 6));
  r.K = static_cast<int>(__ldg(d + 7));
  r.chunk_cols = static_cast<int>(__ldg(d + 8));
  r.tile_rows = static_cast<int>(__ldg(d + 9));
  r.flags = static_cast<int>(__ldg(d + 10));
  return r;
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint64_t* bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_u32(bar)));
}

__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n .reg .pred done;\n WAIT_%=:\n"
      " mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      " @!done bra WAIT_%=;\n}" ::"r"(smem_u32(bar)),
      "r"(parity)
      : "memory");
}

__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(smem_u32(dst)),
      "l"(src), "r"(bytes), "r"(smem_u32(bar))
      : "memory");
}

__device__ __forceinline__ int load_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// The CTA barrier before it orders every thread's writes before this release; an acquire of the counter by thread
// 0 of another program, then its CTA barrier, orders them before that program's reads (CUTLASS's grid barrier).
__device__ __forceinline__ void release_add(int* p) {
  asm volatile("red.release.gpu.global.add.s32 [%0], 1;" ::"l"(p) : "memory");
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float gelu_tanh(float x) {
  return 0.5f * x * (1.f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

// Cache slots [lo, hi) of attention split j below the row's position (persistent.py: split_range).
__device__ __forceinline__ void split_range(int pos, int j, int splits, int& lo, int& hi) {
  int run = (pos + splits - 1) / splits;
  lo = j * run;
  hi = max(lo, min(lo + run, pos));
}

struct Item {
  int op, desc, a, b, c, wait, target, signal;
};

// What the producer reads, copied into shared memory when the program starts: its own items, each weight's address,
// K and chunk width, and the rows' positions. A refill then costs no global round trip (read from global memory,
// three dependent ones per chunk held every warp up at the next CTA barrier: NOTES.md, attempt 6 round 1).
struct Tables {
  const int4* items;  // this program's items, two int4 each
  int first;  // the index of items[0] in the whole table
  const long long* w;  // per descriptor
  const int2* k_cols;  // per descriptor: K, chunk_cols
  const int* pos;  // per row
};

__device__ __forceinline__ Item load_item(const Tables& t, int i) {
  int4 a = t.items[2 * (i - t.first)], b = t.items[2 * (i - t.first) + 1];
  return {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
}

__device__ Tables load_tables(const Params& p, unsigned char* smem, int begin, int end) {
  Tables t{reinterpret_cast<const int4*>(smem + p.items_off), begin,
           reinterpret_cast<const long long*>(smem + p.tables_off),
           reinterpret_cast<const int2*>(smem + p.tables_off + 8 * p.n_desc),
           reinterpret_cast<const int*>(smem + p.tables_off + 16 * p.n_desc)};
  const int4* src = reinterpret_cast<const int4*>(p.items + static_cast<long long>(begin) * ITEM_FIELDS);
  for (int i = threadIdx.x; i < 2 * (end - begin); i += THREADS) const_cast<int4*>(t.items)[i] = __ldg(src + i);
  for (int i = threadIdx.x; i < p.n_desc; i += THREADS) {
    const long long* d = p.descs + static_cast<long long>(i) * DESC_FIELDS;
    const_cast<long long*>(t.w)[i] = d[0];
    const_cast<int2*>(t.k_cols)[i] = make_int2(static_cast<int>(d[7]), static_cast<int>(d[8]));
  }
  for (int i = threadIdx.x; i < p.B; i += THREADS) const_cast<int*>(t.pos)[i] = static_cast<int>(p.positions[i]);
  return t;
}

// Ring chunks of an item: a GEMV's weight tile in column chunks; an attention split's cache range in slot chunks
// (at least one, possibly empty, so that every attention item passes through the ring the same way).
__device__ int n_chunks(const Params& p, const Tables& t, const Item& it) {
  if (it.op == GEMV) {
    int2 kc = t.k_cols[it.desc];
    return (kc.x + kc.y - 1) / kc.y;
  }
  if (it.op == ATTN) {
    int lo, hi;
    split_range(t.pos[it.a], it.c, p.splits, lo, hi);
    return max(1, (hi - lo + p.chunk_positions - 1) / p.chunk_positions);
  }
  return 0;
}

// Issues chunk `chunk` of item `it` into `dst` (warp 0): one bulk copy per weight row, whose shared-memory rows are
// padded by 16 bytes (persistent.py: slot_layout), or the key and the value range of an attention chunk.
__device__ void issue_chunk(const Params& p, const Tables& t, const Item& it, int chunk, unsigned char* dst,
                            uint64_t* bar) {
  int lane = threadIdx.x & 31;
  if (it.op == GEMV) {
    int2 kc = t.k_cols[it.desc];
    const __half* w = reinterpret_cast<const __half*>(t.w[it.desc]);
    int k0 = chunk * kc.y, width = min(kc.y, kc.x - k0), rows = it.b;
    if (lane == 0) mbar_expect_tx(bar, static_cast<uint32_t>(rows * width * 2));
    __syncwarp();
    for (int r = lane; r < rows; r += 32)
      bulk_copy(dst + static_cast<size_t>(r) * (kc.y + 8) * 2, w + static_cast<long long>(it.a + r) * kc.x + k0,
                width * 2, bar);
  } else {
    int lo, hi;
    split_range(t.pos[it.a], it.c, p.splits, lo, hi);
    int p0 = lo + chunk * p.chunk_positions, count = max(0, min(hi, p0 + p.chunk_positions) - p0);
    uint32_t bytes = static_cast<uint32_t>(count * p.D * 2);
    if (lane == 0) mbar_expect_tx(bar, 2 * bytes);
    __syncwarp();
    if (count > 0 && lane < 2) {
      long long off = ((static_cast<long long>(it.desc) * p.B + it.a) * p.H + it.b) * p.S + p0;
      const __half* src = (lane == 0 ? p.k_cache : p.v_cache) + off * p.D;
      bulk_copy(dst + lane * p.chunk_positions * p.D * 2, src, bytes, bar);
    }
  }
}

// The producer's place in the program's list: the next chunk to copy (warp 0 keeps it).
struct Cursor {
  int item, chunk, count, end, issued;
};

__device__ void issue_next(const Params& p, const Tables& t, Cursor& cur, unsigned char* ring, uint64_t* bars) {
  while (cur.item < cur.end && cur.chunk >= cur.count) {
    if (++cur.item < cur.end) cur.count = n_chunks(p, t, load_item(t, cur.item));
    cur.chunk = 0;
  }
  if (cur.item >= cur.end) return;
  int slot = cur.issued % p.slots;
  // the slot's last reads were ordinary loads; order them before the copy engine's writes
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  issue_chunk(p, t, load_item(t, cur.item), cur.chunk, ring + static_cast<size_t>(slot) * p.slot_bytes, bars + slot);
  cur.chunk++;
  cur.issued++;
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
}

__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// The GEMV's input rows as fp16 in shared memory (xs, B rows of xs_stride): LayerNorm of the fp32 residual stream,
// the fp16 MLP hidden, or the attention output combined from its splits' partials. Other programs wrote them in
// this step: loads bypass L1 (.cg), which could hold a line from an earlier stage.
__device__ void load_input(const Params& p, const Desc& d, __half* xs) {
  int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (d.flags & LN) {
    if (warp < p.B) {  // a warp per row, the row in registers: two-pass mean and variance
      const float4* row = reinterpret_cast<const float4*>(p.x + static_cast<long long>(warp) * d.K);
      int n4 = d.K / 4;
      float4 v[MAX_C4];
      float s = 0.f;
#pragma unroll
      for (int i = 0; i < MAX_C4; i++) {
        int idx = lane + 32 * i;
        v[i] = idx < n4 ? __ldcg(row + idx) : make_float4(0.f, 0.f, 0.f, 0.f);
        s += v[i].x + v[i].y + v[i].z + v[i].w;
      }
      float mean = warp_sum(s) / d.K, q = 0.f;
#pragma unroll
      for (int i = 0; i < MAX_C4; i++) {
        if (lane + 32 * i < n4) {
          float a = v[i].x - mean, b = v[i].y - mean, c = v[i].z - mean, e = v[i].w - mean;
          q += a * a + b * b + c * c + e * e;
        }
      }
      float rstd = rsqrtf(warp_sum(q) / d.K + p.eps);
#pragma unroll
      for (int i = 0; i < MAX_C4; i++) {
        int idx = lane + 32 * i;
        if (idx < n4) {
          int k = 4 * idx;
          float y[4] = {v[i].x, v[i].y, v[i].z, v[i].w};
          __align__(8) __half h[4];
#pragma unroll
          for (int e = 0; e < 4; e++)
            h[e] = __float2half((y[e] - mean) * rstd * __half2float(d.ln_w[k + e]) + __half2float(d.ln_b[k + e]));
          *reinterpret_cast<uint2*>(xs + warp * p.xs_stride + k) = *reinterpret_cast<uint2*>(h);
        }
      }
    }
  } else if (d.flags & IN_F16) {
    int per_row = d.K / 8;
    const uint4* in = reinterpret_cast<const uint4*>(d.in);
    for (int i = threadIdx.x; i < p.B * per_row; i += THREADS) {
      int b = i / per_row, k8 = i - b * per_row;
      *reinterpret_cast<uint4*>(xs + b * p.xs_stride + 8 * k8) = __ldcg(in + i);
    }
  } else {  // IN_COMBINE: y[b, h D + d] = sum_j e^(m_j - M) acc_j[d] / sum_j e^(m_j - M) l_j, two features a thread
    int per_row = p.C / 2, stride = p.D + PART_PAD;
    for (int i = threadIdx.x; i < p.B * per_row; i += THREADS) {
      int b = i / per_row, k = 2 * (i - b * per_row), h = k / p.D, dd = k - h * p.D;
      const float* base = p.part + (static_cast<long long>(b) * p.H + h) * p.splits * stride;
      // every split's loads issued at once (unrolled to a constant, predicated): one L2 round trip, not 2 x splits
      float2 ml[MAX_SPLITS], a[MAX_SPLITS];
#pragma unroll
      for (int j = 0; j < MAX_SPLITS; j++) {
        if (j < p.splits) {
          ml[j] = __ldcg(reinterpret_cast<const float2*>(base + j * stride + p.D));
          a[j] = __ldcg(reinterpret_cast<const float2*>(base + j * stride + dd));
        }
      }
      float M = -INFINITY;
#pragma unroll
      for (int j = 0; j < MAX_SPLITS; j++)
        if (j < p.splits) M = fmaxf(M, ml[j].x);
      float den = 0.f, y0 = 0.f, y1 = 0.f;
#pragma unroll
      for (int j = 0; j < MAX_SPLITS; j++) {
        if (j < p.splits) {
          float w = __expf(ml[j].x - M);  // an empty split's max is -inf: weight 0
          den += w * ml[j].y;
          y0 += w * a[j].x;
          y1 += w * a[j].y;
        }
      }
      *reinterpret_cast<__half2*>(xs + b * p.xs_stride + k) = __floats2half2_rn(y0 / den, y1 / den);
    }
  }
}

struct Ring {
  unsigned char* slots;
  uint64_t* bars;
  int consumed;
};

// Waits for the next chunk, returns its slot.
__device__ __forceinline__ unsigned char* ring_front(const Params& p, Ring& ring) {
  int slot = ring.consumed % p.slots;
  mbar_wait(ring.bars + slot, (ring.consumed / p.slots) & 1);
  return ring.slots + static_cast<size_t>(slot) * p.slot_bytes;
}

// Frees the front slot once every warp is done with it, and refills it with the list's next chunk.
__device__ __forceinline__ void ring_pop(const Params& p, const Tables& t, Ring& ring, Cursor& cur) {
  __syncthreads();
  if (threadIdx.x < 32) issue_next(p, t, cur, ring.slots, ring.bars);
  ring.consumed++;
}

// Rows [row0, row0 + rows) of one weight for every batch row. The tile's rows are laid out in row groups of 16 for
// the tensor cores; a last group of 8 (tile_rows an odd multiple of 8) loads 8 rows and zeros the other 8, so that
// no load reads past the tile's layout.
__device__ void run_gemv(const Params& p, const Tables& t, const Item& it, const Desc& d, __half* xs, float* red,
                         Ring& ring, Cursor& cur) {
  int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int groups = (d.tile_rows + 15) / 16, g = warp % groups, kp = warp / groups, nkp = WARPS / groups;
  bool half_group = d.tile_rows - 16 * g == 8;
  float c[4] = {0.f, 0.f, 0.f, 0.f};
  int chunks = (d.K + d.chunk_cols - 1) / d.chunk_cols, rs = d.chunk_cols + 8;
  uint32_t xs_lane = smem_u32(xs) + 2 * (min(lane & 7, p.B - 1) * p.xs_stride + ((lane >> 3) & 1) * 8);
  // x4: lanes 0-15 rows 0-15 at k, lanes 16-31 rows 0-15 at k + 8; x2: lanes 0-7 rows 0-7 at k, 8-15 at k + 8
  int a_row = half_group ? (lane & 7) : (lane & 15), a_col = half_group ? ((lane >> 3) & 1) * 8 : (lane >> 4) * 8;
  for (int ch = 0; ch < chunks; ch++) {
    unsigned char* tile = ring_front(p, ring);
    int k0 = ch * d.chunk_cols, steps = min(d.chunk_cols, d.K - k0) / 16;
    uint32_t a_lane = smem_u32(tile) + 2 * ((g * 16 + a_row) * rs + a_col);
    for (int ks = kp; ks < steps; ks += nkp) {
      uint32_t a[4], b[2];
      if (half_group) {
        uint32_t lo[2];
        ldmatrix_x2(lo, a_lane + 32 * ks);
        a[0] = lo[0], a[1] = 0u, a[2] = lo[1], a[3] = 0u;
      } else {
        ldmatrix_x4(a, a_lane + 32 * ks);
      }
      ldmatrix_x2(b, xs_lane + 2 * (k0 + 16 * ks));
      mma(c, a, b);
    }
    ring_pop(p, t, ring, cur);
  }
  // per warp its 16 x 8 accumulator tile; then the K parts summed in a fixed order
  int r = lane >> 2, col = 2 * (lane & 3);
  float* mine = red + warp * 128;
  mine[r * 8 + col] = c[0];
  mine[r * 8 + col + 1] = c[1];
  mine[(r + 8) * 8 + col] = c[2];
  mine[(r + 8) * 8 + col + 1] = c[3];
  __syncthreads();
  for (int t = threadIdx.x; t < it.b * p.B; t += THREADS) {
    int row = t / p.B, b = t - row * p.B, gg = row / 16, rr = row % 16;
    float v = 0.f;
    for (int k = 0; k < nkp; k++) v += red[(k * groups + gg) * 128 + rr * 8 + b];
    int n = it.a + row;
    if (d.flags & BIAS) v += __half2float(d.bias[n]);
    if (d.flags & GELU) v = gelu_tanh(v);
    long long o = static_cast<long long>(b) * d.N + n;
    if (d.flags & RESIDUAL) {
      float* out = static_cast<float*>(d.out);
      out[o] = __ldcg(out + o) + v;
    } else if (d.flags & OUT_F32) {
      static_cast<float*>(d.out)[o] = v;
    } else {
      static_cast<__half*>(d.out)[o] = __float2half(v);
    }
  }
}

// One split of one (row, head): online softmax over its cache range (plus the new token in split 0, which also
// writes the new key and value at the position), a warp per slot in turn, then the warps' states combined.
__device__ void run_attention(const Params& p, const Tables& t, const Item& it, float* red, Ring& ring,
                              Cursor& cur) {
  int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, dpl = p.D / 32, layer = it.desc, b = it.a, h = it.b;
  int pos = t.pos[b], lo, hi;
  split_range(pos, it.c, p.splits, lo, hi);
  const __half* q_row = p.qkv + static_cast<long long>(b) * 3 * p.C + h * p.D;
  float q[MAX_DPL], acc[MAX_DPL];
  float m = -INFINITY, l = 0.f;
#pragma unroll
  for (int i = 0; i < MAX_DPL; i++) {
    q[i] = i < dpl ? __half2float(__ldcg(q_row + lane * dpl + i)) * p.scale : 0.f;
    acc[i] = 0.f;
  }
  if (it.c == 0 && warp == 0) {
    long long slot = (((static_cast<long long>(layer) * p.B + b) * p.H + h) * p.S + pos) * p.D;
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < MAX_DPL; i++) {
      if (i < dpl) {
        int dd = lane * dpl + i;
        __half kn = __ldcg(q_row + p.C + dd), vn = __ldcg(q_row + 2 * p.C + dd);
        p.k_cache[slot + dd] = kn;
        p.v_cache[slot + dd] = vn;
        s += q[i] * __half2float(kn);
        acc[i] = __half2float(vn);
      }
    }
    m = warp_sum(s);
    l = 1.f;
  }
  int chunks = max(1, (hi - lo + p.chunk_positions - 1) / p.chunk_positions);
  for (int ch = 0; ch < chunks; ch++) {
    const __half* keys = reinterpret_cast<const __half*>(ring_front(p, ring));
    const __half* values = keys + p.chunk_positions * p.D;
    int count = max(0, min(hi, lo + (ch + 1) * p.chunk_positions) - lo - ch * p.chunk_positions);
    for (int s_i = warp; s_i < count; s_i += WARPS) {
      float s = 0.f;
#pragma unroll
      for (int i = 0; i < MAX_DPL; i++)
        if (i < dpl) s += q[i] * __half2float(keys[s_i * p.D + lane * dpl + i]);
      s = warp_sum(s);
      float m_new = fmaxf(m, s), alpha = __expf(m - m_new), beta = __expf(s - m_new);
      l = l * alpha + beta;
#pragma unroll
      for (int i = 0; i < MAX_DPL; i++)
        if (i < dpl) acc[i] = acc[i] * alpha + beta * __half2float(values[s_i * p.D + lane * dpl + i]);
      m = m_new;
    }
    ring_pop(p, t, ring, cur);
  }
  int stride = p.D + PART_PAD;
  float* mine = red + warp * stride;
#pragma unroll
  for (int i = 0; i < MAX_DPL; i++)
    if (i < dpl) mine[lane * dpl + i] = acc[i];
  if (lane == 0) mine[p.D] = m, mine[p.D + 1] = l;
  __syncthreads();
  float* out = p.part + ((static_cast<long long>(b) * p.H + h) * p.splits + it.c) * stride;
  for (int d = threadIdx.x; d < p.D; d += THREADS) {
    float M = -INFINITY;
    for (int w = 0; w < WARPS; w++) M = fmaxf(M, red[w * stride + p.D]);
    float L = 0.f, A = 0.f;
    if (M != -INFINITY) {
      for (int w = 0; w < WARPS; w++) {
        float e = __expf(red[w * stride + p.D] - M);
        L += e * red[w * stride + p.D + 1];
        A += e * red[w * stride + d];
      }
    }
    out[d] = A;
    if (d == 0) out[p.D] = M, out[p.D + 1] = L;
  }
}

__global__ void __launch_bounds__(THREADS, 1) persistent_step(const Params p) {
  extern __shared__ __align__(128) unsigned char smem[];
  __half* xs = reinterpret_cast<__half*>(smem + p.xs_off);
  float* red = reinterpret_cast<float*>(smem + p.red_off);
  Ring ring{smem, reinterpret_cast<uint64_t*>(smem + p.bar_off), 0};
  int begin = p.offsets[blockIdx.x], end = p.offsets[blockIdx.x + 1];
  if (threadIdx.x == 0) {
    for (int s = 0; s < p.slots; s++) mbar_init(ring.bars + s);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  Tables t = load_tables(p, smem, begin, end);
  __syncthreads();
  Cursor cur{begin, 0, begin < end ? n_chunks(p, t, load_item(t, begin)) : 0, end, 0};
  if (threadIdx.x < 32)
    for (int s = 0; s < p.slots; s++) issue_next(p, t, cur, ring.slots, ring.bars);
  int loaded = -1;  // the descriptor whose input xs holds: a stage's items share it
  for (int i = begin; i < end; i++) {
    Item it = load_item(t, i);
    // the descriptor does not depend on the step's activations: into L1 during the wait, not after it
    const long long* desc = p.descs + static_cast<long long>(max(it.desc, 0)) * DESC_FIELDS;
    if (it.op == GEMV && threadIdx.x < 2)
      asm volatile("prefetch.global.L1 [%0];" ::"l"(desc + threadIdx.x * (DESC_FIELDS - 1)));
    if (it.wait >= 0) {
      if (threadIdx.x == 0) {
        while (load_acquire(p.counters + it.wait) < it.target) {
        }
      }
      __syncthreads();
    }
    if (it.op == GEMV) {
      Desc d = load_desc(desc);
      if (it.desc != loaded) {
        load_input(p, d, xs);
        loaded = it.desc;
        __syncthreads();
      }
      run_gemv(p, t, it, d, xs, red, ring, cur);
    } else if (it.op == ATTN) {
      run_attention(p, t, it, red, ring, cur);
    } else {
      int tok = static_cast<int>(p.tokens[it.a]), pos = t.pos[it.a];
      for (int k = threadIdx.x; k < p.C; k += THREADS)
        p.x[it.a * p.C + k] = __half2float(p.wte[static_cast<long long>(tok) * p.C + k]) +
                              __half2float(p.wpe[static_cast<long long>(pos) * p.C + k]);
    }
    __syncthreads();  // the item's outputs are written (and its scratch free) before it is counted
    if (threadIdx.x == 0) release_add(p.counters + it.signal);
  }
  if (threadIdx.x == 0) {  // the last program out resets the counters for the next launch (a graph replay)
    __threadfence();
    if (atomicAdd(p.counters + p.n_counters, 1) == static_cast<int>(gridDim.x) - 1) {
      for (int k = 0; k <= p.n_counters; k++) p.counters[k] = 0;
      __threadfence();
    }
  }
}

}  // namespace

extern "C" {

// Blocks of the kernel that fit one SM with `smem_bytes` of dynamic shared memory (raising the kernel's limit);
// negative: a CUDA error code.
int mmgpt_blocks_per_sm(int smem_bytes, int device) {
  cudaError_t e = cudaSetDevice(device);  // this library's runtime keeps its own current device
  if (e == cudaSuccess) e = cudaFuncSetAttribute(persistent_step, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  int blocks = 0;
  if (e == cudaSuccess) e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, persistent_step, THREADS, smem_bytes);
  return e == cudaSuccess ? blocks : -static_cast<int>(e);
}

const char* mmgpt_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

// ptrs: items, offsets, descs, counters, tokens, positions, wte, wpe, x, qkv, k_cache, v_cache, part (device
// addresses); ints: n_programs, n_counters, B, C, H, D, S, splits, chunk_positions, slots, slot_bytes, xs_stride,
// xs_off, red_off, bar_off, smem_bytes, device, items_off, tables_off, n_desc. Returns the launch's CUDA error code.
int mmgpt_persistent_step(const long long* ptrs, const int* ints, float eps, float scale, void* stream) {
  cudaError_t e = cudaSetDevice(ints[16]);
  if (e != cudaSuccess) return static_cast<int>(e);
  Params p;
  p.items = reinterpret_cast<const int*>(ptrs[0]);
  p.offsets = reinterpret_cast<const int*>(ptrs[1]);
  p.descs = reinterpret_cast<const long long*>(ptrs[2]);
  p.counters = reinterpret_cast<int*>(ptrs[3]);
  p.tokens = reinterpret_cast<const long long*>(ptrs[4]);
  p.positions = reinterpret_cast<const long long*>(ptrs[5]);
  p.wte = reinterpret_cast<const __half*>(ptrs[6]);
  p.wpe = reinterpret_cast<const __half*>(ptrs[7]);
  p.x = reinterpret_cast<float*>(ptrs[8]);
  p.qkv = reinterpret_cast<const __half*>(ptrs[9]);
  p.k_cache = reinterpret_cast<__half*>(ptrs[10]);
  p.v_cache = reinterpret_cast<__half*>(ptrs[11]);
  p.part = reinterpret_cast<float*>(ptrs[12]);
  p.n_counters = ints[1];
  p.B = ints[2];
  p.C = ints[3];
  p.H = ints[4];
  p.D = ints[5];
  p.S = ints[6];
  p.splits = ints[7];
  p.chunk_positions = ints[8];
  p.slots = ints[9];
  p.slot_bytes = ints[10];
  p.xs_stride = ints[11];
  p.xs_off = ints[12];
  p.red_off = ints[13];
  p.bar_off = ints[14];
  p.items_off = ints[17];
  p.tables_off = ints[18];
  p.n_desc = ints[19];
  p.eps = eps;
  p.scale = scale;
  persistent_step<<<ints[0], THREADS, ints[15], static_cast<cudaStream_t>(stream)>>>(p);
  return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
