"""The schedule of the persistent decode step (`persistent_step.cu`): the whole GPT-2 decode step as one table of
work items that one program per SM interprets, and a float32 reference executor of that table.

The kernel only reads the table. Each item is a row of ITEM_FIELDS int32:

    op      EMBED (x[b] = wte[token] + wpe[position]), GEMV (rows [row0, row0 + rows) of one weight, all batch rows
            at once), ATTN (one row b, head h, split j of the used cache: a partial softmax)
    desc    GEMV: index into the GEMV descriptors (which weight, input, output and epilogue); ATTN: the layer
    args    GEMV: row0, rows; ATTN: b, h, j; EMBED: b (three fields)
    wait    the counter this item waits on (-1: none), and the value it must reach (the producing stage's items)
    signal  the counter it adds one to once its outputs are written

Items of one stage (a layer's QKV, attention, attention out, MLP up, MLP down; the embedding; the head) share a
counter. Every item waits on the stage before its own, and no buffer is reused within fewer stages than separate
its writer from its last reader, so the per-stage waits order every read after its write and every overwrite after
its last read (tests/test_persistent.py checks this by simulation). Items are spread over the programs stage by
stage onto the program with the fewest weight bytes so far, so a program's list is in stage order and it never
waits on an item of its own that comes later.

Each GEMV item streams its weight tile through a shared-memory ring in chunks of `chunk_cols` columns; the
attention item streams its cache range in chunks of `chunk_positions` slots. The kernel issues a chunk's copy as
soon as a ring slot is free, before the wait of the item it belongs to: weights and the cache below the position
never depend on the step's activations, so only the small activation reads sit on the path from one stage to the
next.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmgpt.model import MultimodalGPT

EMBED, GEMV, ATTN = 0, 1, 2
ITEM_FIELDS = 8
OP, DESC, ARG0, ARG1, ARG2, WAIT, TARGET, SIGNAL = range(ITEM_FIELDS)
# GEMV flags: what the kernel does before and after the product
LN, BIAS, GELU, RESIDUAL, IN_COMBINE, IN_F16, OUT_F32 = 1, 2, 4, 8, 16, 32, 64
MAX_TILE_ROWS = 32  # weight rows per GEMV item: two 16-row tensor-core groups (mma.m16n8k16)
WARPS = 16  # per program (512 threads)
MAX_SPLITS = 8  # attention splits per (row, head): the kernel combines their partials in registers
PART_PAD = 4  # an attention partial is acc[D], then max and sum, padded so the next partial stays 16-byte aligned


@dataclass(frozen=True)
class GemvDesc:
    """One weight's product: out[:, rows] (+)= act(in @ W[rows]^T + bias). `layer` -1 is the head."""
    name: str  # qkv, attn_out, fc, proj, head
    layer: int
    N: int
    K: int
    flags: int
    rows: int  # weight rows per item (the last item may have fewer)
    tile_rows: int  # rows laid out per chunk in a ring slot: `rows` rounded up to the tensor cores' 8-row loads
    chunk_cols: int


@dataclass(frozen=True)
class Schedule:
    """A decode step's work items for one (model shape, batch, program count, cache capacity, ring slot)."""
    items: torch.Tensor  # (n_items, ITEM_FIELDS) int32, program 0's items first, each program's in stage order
    offsets: torch.Tensor  # (n_programs + 1,) int32: program p runs items[offsets[p]:offsets[p + 1]]
    descs: tuple[GemvDesc, ...]
    stage_items: tuple[int, ...]  # items per stage = the value that stage's counter reaches
    batch: int
    n_programs: int
    splits: int  # attention splits of each (row, head)'s used cache
    chunk_positions: int  # cache slots per attention chunk
    n_embd: int
    n_head: int
    head_dim: int
    n_layer: int

    @property
    def n_counters(self) -> int:
        return len(self.stage_items)


def slot_layout(rows: int, cols: int) -> int:
    """Bytes a (rows, cols) fp16 tile takes in a ring slot: each row padded by 16 bytes so that the tensor cores'
    8-row loads (ldmatrix) hit 8 different bank groups when a row is a multiple of 128 bytes."""
    return rows * (cols + 8) * 2


def chunk_cols(rows: int, K: int, slot_bytes: int) -> int:
    """Columns per chunk: the fewest chunks whose padded tile fits a slot, split evenly, multiples of 16."""
    widest = (slot_bytes // (2 * rows) - 8) // 16 * 16
    if widest < 16:
        raise ValueError(f"a ring slot of {slot_bytes} bytes holds no {rows}-row tile")
    n = math.ceil(K / widest)
    return math.ceil(K / n / 16) * 16


def build_schedule(model_config, batch: int, n_programs: int, capacity: int, slot_bytes: int,
                   splits: int | None = None) -> Schedule:
    """The item table of one decode step of a GPT-2 model. `splits` (None: from the batch) cuts each (row, head)'s
    used cache into that many attention items, so rows x heads x splits fills the programs."""
    c = model_config
    C, H, D, L, F, V = c.n_embd, c.n_head, c.head_dim, c.n_layer, c.intermediate_size, c.vocab_size
    if splits is None:  # about one attention item per program; at least 2 while that leaves programs idle
        splits = min(MAX_SPLITS, max(math.ceil(n_programs / (batch * H)), 2 if batch * H < 2 * n_programs else 1))
    if not 1 <= splits <= MAX_SPLITS:
        raise ValueError(f"splits={splits}: the kernel combines 1 to {MAX_SPLITS} attention splits")
    splits = min(splits, capacity)

    def desc(name, layer, N, K, flags):
        # one item per program per round of n_programs items (a stage's critical path is one item, not two), as
        # few rounds as tiles of at most MAX_TILE_ROWS rows allow
        rounds = math.ceil(N / (MAX_TILE_ROWS * n_programs))
        rows = math.ceil(N / (rounds * n_programs))
        tile_rows = math.ceil(rows / 8) * 8
        return GemvDesc(name, layer, N, K, flags, rows, tile_rows, chunk_cols(tile_rows, K, slot_bytes))
    descs = []
    for layer in range(L):
        descs += [desc("qkv", layer, 3 * C, C, LN | BIAS), desc("attn_out", layer, C, C, IN_COMBINE | BIAS | RESIDUAL),
                  desc("fc", layer, F, C, LN | BIAS | GELU), desc("proj", layer, C, F, IN_F16 | BIAS | RESIDUAL)]
    descs.append(desc("head", -1, V, C, LN | OUT_F32))

    stages: list[list[list[int]]] = []  # per stage, its items (without wait / signal)
    stages.append([[EMBED, 0, b, 0, 0] for b in range(batch)])
    for i, d in enumerate(descs):
        tiles = [[GEMV, i, r, min(d.rows, d.N - r), 0] for r in range(0, d.N, d.rows)]
        stages.append(tiles)
        if d.name == "qkv":
            stages.append([[ATTN, d.layer, b, h, j] for b in range(batch) for h in range(H) for j in range(splits)])

    def weight_bytes(item):
        if item[OP] != GEMV:
            return 0
        return item[ARG1] * descs[item[DESC]].K * 2
    load = [(0, p) for p in range(n_programs)]  # (weight bytes given so far, program): a heap
    lists: list[list[list[int]]] = [[] for _ in range(n_programs)]
    for s, stage in enumerate(stages):
        wait = [s - 1, len(stages[s - 1])] if s else [-1, 0]
        # heaviest items first, each round of n_programs onto as many distinct programs, the least loaded first
        # (ties: the lowest id): deterministic, and no program gets a second item of a stage before all have one
        ordered = sorted(stage, key=lambda it: -weight_bytes(it))
        for start in range(0, len(ordered), n_programs):
            chunk = ordered[start:start + n_programs]
            taken = [heapq.heappop(load) for _ in chunk]
            for item, (done, p) in zip(chunk, taken):
                heapq.heappush(load, (done + max(weight_bytes(item), 1), p))  # a weightless item counts as 1
                lists[p].append(item + wait + [s])
    rows = [item for lst in lists for item in lst]
    offsets = [0]
    for lst in lists:
        offsets.append(offsets[-1] + len(lst))
    return Schedule(torch.tensor(rows, dtype=torch.int32).reshape(-1, ITEM_FIELDS),
                    torch.tensor(offsets, dtype=torch.int32), tuple(descs), tuple(len(s) for s in stages), batch,
                    n_programs, splits, max(1, slot_bytes // (4 * D)), C, H, D, L)


@dataclass(frozen=True)
class SharedLayout:
    """The kernel's shared memory, byte offsets (the ring of `slots` slots starts at 0): the GEMV input rows (xs),
    the reduction scratch, the slots' mbarriers, the program's own items and the producer's tables."""
    slots: int
    slot_bytes: int
    xs_stride: int  # fp16 elements per input row: the widest K, padded like a ring row
    xs_off: int
    red_off: int
    bar_off: int
    items_off: int
    tables_off: int
    total: int


def _round(n: int, to: int = 128) -> int:
    return -(-n // to) * to


def plan_step(model_config, batch: int, n_programs: int, capacity: int, smem_limit: int, slots: int,
              splits: int | None = None) -> tuple[Schedule, SharedLayout] | None:
    """The schedule and the shared-memory layout of one step, the slots as large as `smem_limit` bytes allow; None
    when a slot would be too small to hold a tile."""
    c = model_config
    xs_stride = max(c.n_embd, c.intermediate_size) + 8
    xs = _round(batch * xs_stride * 2)
    red = _round(4 * max(WARPS * 16 * 8, WARPS * (c.head_dim + PART_PAD)))
    # the items per program do not depend on the slot size: a first schedule sizes the item and table regions
    first = build_schedule(c, batch, n_programs, capacity, 1 << 15, splits)
    items = _round(32 * int((first.offsets[1:] - first.offsets[:-1]).max()))
    tables = _round(16 * len(first.descs) + 4 * batch)  # addresses, (K, chunk width) pairs, positions
    fixed = xs + red + _round(8 * slots) + items + tables
    slot_bytes = (smem_limit - fixed) // slots // 128 * 128
    if slot_bytes < slot_layout(MAX_TILE_ROWS, 16 * 8):  # fewer than 128 columns of a full tile per chunk
        return None
    ring = slots * slot_bytes
    bars = ring + xs + red
    layout = SharedLayout(slots, slot_bytes, xs_stride, ring, ring + xs, bars, bars + _round(8 * slots),
                          bars + _round(8 * slots) + items, ring + fixed)
    return build_schedule(c, batch, n_programs, capacity, slot_bytes, splits), layout


def split_range(position: int, split: int, splits: int) -> tuple[int, int]:
    """Cache slots [lo, hi) that attention split `split` reads below `position` (the kernel's formula): equal runs,
    so the work follows the position on the device while the table stays fixed for a CUDA graph."""
    run = -(-position // splits)
    lo = split * run
    return lo, max(lo, min(lo + run, position))


def item_regions(s: Schedule, item, positions: list[int]) -> tuple[list, list]:
    """(reads, writes) of one item as (buffer, index) pairs over flat element indices: what the kernel touches
    (x (B, C), qkv (B, 3C), hidden (B, F), part (B, H, splits, D + PART_PAD), logits (B, V), k/v caches
    (L, B, H, S, D) with S = max(positions) + 1). The simulator in tests/test_persistent.py replays these."""
    C, H, D, Bn = s.n_embd, s.n_head, s.head_dim, s.batch
    op = int(item[OP])
    reads, writes = [], []

    def rows_of(buf, width, lo, hi, batch_rows=range(Bn)):
        return [(buf, b * width + k) for b in batch_rows for k in range(lo, hi)]
    if op == EMBED:
        writes += rows_of("x", C, 0, C, [int(item[ARG0])])
    elif op == ATTN:
        layer, b, h, j = (int(item[f]) for f in (DESC, ARG0, ARG1, ARG2))
        S = max(positions) + 1
        pos = positions[b]
        reads += [("qkv", b * 3 * C + part * C + h * D + d) for part in range(3) for d in range(D)]
        lo, hi = split_range(pos, j, s.splits)
        cache = ((layer * Bn + b) * H + h) * S
        reads += [(name, (cache + p) * D + d) for name in ("k", "v") for p in range(lo, hi) for d in range(D)]
        if j == 0:
            writes += [(name, (cache + pos) * D + d) for name in ("k", "v") for d in range(D)]
        width = D + PART_PAD
        writes += [("part", ((b * H + h) * s.splits + j) * width + d) for d in range(width)]
    else:
        d = s.descs[int(item[DESC])]
        r0, n = int(item[ARG0]), int(item[ARG1])
        if d.flags & IN_COMBINE:
            reads += rows_of("part", H * s.splits * (D + PART_PAD), 0, H * s.splits * (D + PART_PAD))
        else:
            reads += rows_of("hidden" if d.flags & IN_F16 else "x", d.K, 0, d.K)
        out = {"qkv": "qkv", "fc": "hidden", "head": "logits"}.get(d.name, "x")
        if d.flags & RESIDUAL:
            reads += rows_of(out, d.N, r0, r0 + n)
        writes += rows_of(out, d.N, r0, r0 + n)
    return reads, writes


def execute_reference(s: Schedule, model: MultimodalGPT, tokens: torch.Tensor, positions: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """Runs the table item by item in stage order in float32 on the CPU, as the kernel computes each item (tiles,
    attention splits and their combination), writing the new keys / values into the caches: logits (B, V).
    Ties the table's ranges and ops to the model's numbers, not only to their shapes."""
    c = model.config
    C, H, D, Bn, sp = c.n_embd, c.n_head, c.head_dim, s.batch, s.splits
    f32 = {n: p.detach().float().cpu() for n, p in model.named_parameters()}
    blocks = [f"transformer.h.{i}." for i in range(c.n_layer)]
    weights = {"qkv": "attn.c_attn", "attn_out": "attn.c_proj", "fc": "mlp.c_fc", "proj": "mlp.c_proj"}
    ln_of = {"qkv": "ln_1", "fc": "ln_2"}
    head = model.head(c.decoded).weight.detach().float().cpu()
    table, wpe = model.table(c.decoded).weight.detach().float().cpu(), f32["transformer.wpe.weight"]
    final = (model.final_norm.weight.detach().float().cpu(), model.final_norm.bias.detach().float().cpu())
    x = torch.zeros(Bn, C)
    bufs = {"qkv": torch.zeros(Bn, 3 * C), "hidden": torch.zeros(Bn, c.intermediate_size),
            "logits": torch.zeros(Bn, c.vocab_size)}
    part = torch.zeros(Bn, H, sp, D + 2)  # acc[D], max, sum
    tokens, positions = tokens.reshape(-1).tolist(), positions.reshape(-1).tolist()
    order = sorted(range(s.items.shape[0]), key=lambda i: int(s.items[i, SIGNAL]))  # stage order
    for i in order:
        item = s.items[i].tolist()
        if item[OP] == EMBED:
            b = item[ARG0]
            x[b] = table[tokens[b]] + wpe[positions[b]]
        elif item[OP] == ATTN:
            layer, b, h, j = item[DESC], item[ARG0], item[ARG1], item[ARG2]
            pos = positions[b]
            q = bufs["qkv"][b, h * D:(h + 1) * D] * D ** -0.5
            lo, hi = split_range(pos, j, sp)
            keys, values = k_cache[layer, b, h, lo:hi].float(), v_cache[layer, b, h, lo:hi].float()
            if j == 0:  # split 0 writes the new key / value and attends to it (the cache holds the model's dtype)
                k_new = bufs["qkv"][b, C + h * D:C + (h + 1) * D].to(k_cache.dtype)
                v_new = bufs["qkv"][b, 2 * C + h * D:2 * C + (h + 1) * D].to(v_cache.dtype)
                k_cache[layer, b, h, pos], v_cache[layer, b, h, pos] = k_new, v_new
                keys, values = torch.cat([keys, k_new.float()[None]]), torch.cat([values, v_new.float()[None]])
            scores = keys @ q
            m = scores.max() if scores.numel() else torch.tensor(float("-inf"))
            p = torch.exp(scores - m) if scores.numel() else scores
            part[b, h, j] = torch.cat([p @ values if scores.numel() else torch.zeros(D), m[None], p.sum()[None]])
        else:
            d = s.descs[item[DESC]]
            r0, n = item[ARG0], item[ARG1]
            prefix = blocks[d.layer] if d.layer >= 0 else None
            w = head if prefix is None else f32[prefix + weights[d.name] + ".weight"]
            if d.flags & IN_COMBINE:
                m = part[..., D]  # (B, H, splits); split 0 always holds the new token, so the max is finite
                scale = torch.exp(m - m.max(-1, keepdim=True).values)
                inp = ((scale[..., None] * part[..., :D]).sum(2) / (scale * part[..., D + 1]).sum(-1)[..., None])
                inp = inp.reshape(Bn, C)
            elif d.flags & IN_F16:
                inp = bufs["hidden"]
            else:
                g, beta = final if prefix is None else (f32[prefix + ln_of[d.name] + ".weight"],
                                                        f32[prefix + ln_of[d.name] + ".bias"])
                inp = torch.nn.functional.layer_norm(x, (C,), g, beta, model.final_norm.eps)
            out = inp @ w[r0:r0 + n].T
            if d.flags & BIAS:
                out = out + f32[prefix + weights[d.name] + ".bias"][r0:r0 + n]
            if d.flags & GELU:
                out = F.gelu(out, approximate="tanh")  # GPT-2's gelu_new, as the kernel computes
            if d.flags & RESIDUAL:
                x[:, r0:r0 + n] += out
            else:
                bufs[{"qkv": "qkv", "fc": "hidden", "head": "logits"}[d.name]][:, r0:r0 + n] = out
    return bufs["logits"]
