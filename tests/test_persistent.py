"""The persistent decode step's schedule (mmgpt/kernels/persistent.py), on the CPU: the counter waits alone order
every read after its write and every overwrite after its last read, in any interleaving of the programs; no
program waits on its own later work; and the table, executed item by item, computes the torch backend's step."""
import random

import pytest
import torch

from mmgpt.kernels.persistent import (ATTN, EMBED, GEMV, OP, SIGNAL, TARGET, WAIT, build_schedule, execute_reference,
                                      item_regions, plan_step, slot_layout)
from mmgpt.model import GPTConfig, MultimodalGPT, image_to_text
from mmgpt.runtime.backends.torch_model import TorchBackend

PROGRAMS = 5
SLOT = 4096  # bytes: tiles of 32 columns and attention chunks of 16 slots, so items take several chunks


def tiny_model(n_layer=2, n_embd=64, n_head=2):
    torch.manual_seed(0)
    return MultimodalGPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=64, vocab_size=300,
                                   **image_to_text(5))).eval()


def simulate(schedule, positions, rng) -> str | None:
    """Runs the table with PROGRAMS virtual programs, each item as a start (its reads) and a finish (its writes, then
    its signal), choosing at random among the events the counter waits allow. Returns the first hazard: a read
    that sees another version than in stage order (read before its producer finished, or after a later item
    overwrote it; checked at the item's start and again at its finish), a deadlock, or final contents that differ."""
    items = schedule.items.tolist()
    regions = [item_regions(schedule, it, positions) for it in items]
    writer, expected = {}, {}
    for i in sorted(range(len(items)), key=lambda i: items[i][SIGNAL]):  # stage order: the reference execution
        reads, writes = regions[i]
        expected[i] = {cell: writer.get(cell) for cell in reads}
        writer.update({cell: i for cell in writes})
    version: dict = {}
    counters = [0] * schedule.n_counters
    offsets = schedule.offsets.tolist()
    next_item = offsets[:-1]
    running: dict[int, int] = {}

    def stale(i):
        return next((cell for cell, want in expected[i].items() if version.get(cell) != want), None)
    while True:
        events = [("finish", p) for p in running]
        for p in range(len(offsets) - 1):
            i = next_item[p]
            if p not in running and i < offsets[p + 1] and (items[i][WAIT] < 0
                                                            or counters[items[i][WAIT]] >= items[i][TARGET]):
                events.append(("start", p))
        if not events:
            left = [p for p in range(len(offsets) - 1) if next_item[p] < offsets[p + 1]]
            if left:
                return f"deadlock: programs {left} wait forever"
            break
        kind, p = rng.choice(events)
        i = running.pop(p) if kind == "finish" else next_item[p]
        cell = stale(i)
        if cell is not None:
            return (f"item {i} {items[i]} at its {kind} reads {cell} written by item {version.get(cell)}, not "
                    f"{expected[i][cell]}")
        if kind == "start":
            running[p] = i
        else:
            version.update({c: i for c in regions[i][1]})
            counters[items[i][SIGNAL]] += 1
            next_item[p] += 1
    wrong = [cell for cell, i in writer.items() if version.get(cell) != i]
    return f"final contents of {wrong[:3]} differ from stage order" if wrong else None


def hazard_in(schedule, positions, runs, seed=0):
    rng = random.Random(seed)
    return next((h for h in (simulate(schedule, positions, rng) for _ in range(runs)) if h), None)


@pytest.mark.parametrize("batch,positions", [(1, [9]), (3, [7, 0, 20])])
def test_the_waits_order_every_access_in_any_interleaving(batch, positions):
    s = build_schedule(tiny_model().config, batch, PROGRAMS, 24, SLOT)
    assert {op for op in s.items[:, OP].tolist()} == {EMBED, GEMV, ATTN}
    assert hazard_in(s, positions, runs=30) is None


@pytest.mark.parametrize("op", [GEMV, ATTN])
def test_a_missing_wait_is_caught(op):
    """Negative control: the same table with one item's wait removed (the first item of that kind after the
    embedding) races in some interleaving."""
    s = build_schedule(tiny_model().config, 3, PROGRAMS, 24, SLOT)
    items = s.items.clone()
    victim = next(i for i in range(len(items)) if items[i, OP] == op and items[i, WAIT] > 0)
    items[victim, WAIT] = -1
    broken = type(s)(**{**s.__dict__, "items": items})
    assert hazard_in(broken, [7, 0, 20], runs=30) is not None


def test_no_program_waits_on_its_own_later_items():
    """A program runs its list in order: an item whose wait counts one of the same program's later items (or
    itself) would never start. Checked at GPT-2 124M's shape on an H200's 132 programs, and at batch 8."""
    config = GPTConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, **image_to_text(5))
    for batch in (1, 8):
        s = build_schedule(config, batch, 132, 1024, 30208)
        offsets, items = s.offsets.tolist(), s.items.tolist()
        for p in range(len(offsets) - 1):
            own = items[offsets[p]:offsets[p + 1]]
            for k, item in enumerate(own):
                assert all(later[SIGNAL] != item[WAIT] for later in own[k:]), (p, k, item)
        stages = [it[SIGNAL] for it in items]
        assert [stages.count(i) for i in range(s.n_counters)] == list(s.stage_items)
        # every output row of every weight is computed exactly once
        for d_index, d in enumerate(s.descs):
            rows = sorted((it[2], it[3]) for it in items if it[OP] == GEMV and it[1] == d_index)
            assert [r for r, _ in rows] == list(range(0, d.N, d.rows)) and sum(n for _, n in rows) == d.N
            assert d.rows <= d.tile_rows <= 32 and d.tile_rows % 8 == 0
        # a stage of at most 132 items puts at most one on each program
        for stage, count in enumerate(s.stage_items):
            on = [sum(1 for it in items[offsets[p]:offsets[p + 1]] if it[SIGNAL] == stage) for p in range(132)]
            assert max(on) == -(-count // 132), (stage, count, max(on))


@pytest.mark.parametrize("batch,positions,capacity", [(1, [0], 8), (3, [7, 0, 20], 24), (2, [40, 13], 48)])
def test_the_table_computes_the_torch_step(batch, positions, capacity):
    """The table executed item by item in float32 (tiles, attention splits and their combination) gives the torch
    backend's logits and writes the same keys and values; a table with one attention split left out does not."""
    model = tiny_model()
    c = model.config
    s = build_schedule(c, batch, PROGRAMS, capacity, SLOT)
    k = torch.randn(c.n_layer, batch, c.n_head, capacity, c.head_dim)
    v = torch.randn_like(k)
    ids = torch.randint(0, c.vocab_size, (batch, 1))
    pos = torch.tensor(positions)[:, None]
    k_ref, v_ref, k_got, v_got = k.clone(), v.clone(), k.clone(), v.clone()
    with torch.no_grad():
        want = TorchBackend(model).decode(ids, pos, k_ref, v_ref)
    got = execute_reference(s, model, ids, pos, k_got, v_got)
    assert (got - want).abs().max() < 1e-5 * max(1.0, want.abs().max().item())
    assert torch.allclose(k_got, k_ref, atol=1e-5) and torch.allclose(v_got, v_ref, atol=1e-5)
    if max(positions) >= 2 * s.splits:  # some split other than the first reads cached slots
        j = next(i for i in range(len(s.items)) if s.items[i, OP] == ATTN and s.items[i, 4] == s.splits - 1
                 and positions[s.items[i, 2]] >= 2 * s.splits)
        dropped = type(s)(**{**s.__dict__, "items": torch.cat([s.items[:j], s.items[j + 1:]])})
        bad = execute_reference(dropped, model, ids, pos, k.clone(), v.clone())
        assert (bad - want).abs().max() > 1e-3


def test_the_backend_refuses_what_the_kernel_cannot_run():
    """fp32 weights, a CPU, another family: a UserError that names the backend to use instead."""
    from mmgpt.errors import UserError
    from mmgpt.runtime.backends.persistent import PersistentBackend
    with pytest.raises(UserError, match="fp16 weights.*torch-triton"):
        PersistentBackend(tiny_model())
    with pytest.raises(UserError, match="compute capability 9.0.*torch-triton"):
        PersistentBackend(tiny_model().half())
    llama = MultimodalGPT(GPTConfig(family="llama", n_layer=1, n_head=2, n_embd=64, intermediate_size=128,
                                    vocab_size=300, block_size=64, **image_to_text(5))).half()
    with pytest.raises(UserError, match="GPT-2 family.*torch-triton"):
        PersistentBackend(llama)


GPT2_SHAPES = {"124m": (12, 12, 768), "355m": (24, 16, 1024), "1p5b": (48, 25, 1600)}
H200_SHARED = 232448  # bytes of shared memory a program may opt into on an H100 / H200


@pytest.mark.parametrize("size", list(GPT2_SHAPES))
def test_the_shared_memory_layout_holds_what_the_kernel_puts_there(size):
    """At GPT-2's shapes on an H200, batch 1-8: the regions tile the shared memory in order, within the limit, and
    each holds its largest content (a chunk of every weight's tile, an attention chunk, the batch's input rows, the
    busiest program's items, the producer's tables); with less shared memory there is no layout."""
    n_layer, n_head, n_embd = GPT2_SHAPES[size]
    config = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=50257, **image_to_text(5))
    for batch in (1, 3, 8):
        s, lay = plan_step(config, batch, 132, 1024, H200_SHARED, 6)
        bounds = [0, lay.xs_off, lay.red_off, lay.bar_off, lay.items_off, lay.tables_off, lay.total]
        assert bounds == sorted(bounds) and lay.total <= H200_SHARED and lay.xs_off == lay.slots * lay.slot_bytes
        assert all(b % 16 == 0 for b in bounds) and lay.slot_bytes % 128 == 0
        for d in s.descs:
            assert slot_layout(d.tile_rows, d.chunk_cols) <= lay.slot_bytes and d.chunk_cols % 16 == 0
            assert d.K % 16 == 0 and d.K <= lay.xs_stride - 8
        assert s.chunk_positions * 4 * config.head_dim <= lay.slot_bytes
        assert batch * lay.xs_stride * 2 <= lay.red_off - lay.xs_off
        assert 16 * 128 * 4 <= lay.bar_off - lay.red_off and 8 * lay.slots <= lay.items_off - lay.bar_off
        assert 32 * int((s.offsets[1:] - s.offsets[:-1]).max()) <= lay.tables_off - lay.items_off
        assert 16 * len(s.descs) + 4 * batch <= lay.total - lay.tables_off
    assert plan_step(config, 8, 132, 1024, 64 * 1024, 6) is None
