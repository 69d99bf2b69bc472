"""The exported graphs, each declaring its own contract: names, dynamic axes, sample inputs (DESIGN.md).

Names follow Hugging Face optimum. All three wrap `MultimodalGPT.forward_cached`, the same function the PyTorch
backend runs, so the graphs cannot drift from the model:
  prefill            prefix + prompt -> logits, present.* (B, H, P+T, D)
  decode             one token over a past of capacity S -> logits, present.* (B, H, 1, D)
  context_generation both flows in one graph, for one engine with two optimization profiles (`shared`):
                     the context profile sets S = 0, the generation profile P = 0 and T = 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.export import Dim

from mmgpt.model import MultimodalGPT

# Example sizes for tracing: all >= 2 and pairwise different, so no dim is specialised or unified with another.
TRACE_BATCH, TRACE_PREFIX, TRACE_TEXT, TRACE_CACHE = 2, 3, 5, 7


def present_names(n_layer: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


def past_names(n_layer: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


def interleave(keys, values):
    """[k0, v0, k1, v1, ...]: the order of the present.* outputs and past_key_values.* inputs."""
    return [t for kv in zip(keys, values) for t in kv]


def _split_past(past):
    return list(past[0::2]), list(past[1::2])


class PrefillGraph(torch.nn.Module):
    def __init__(self, model: MultimodalGPT):
        super().__init__()
        self.model = model

    def forward(self, prefix, input_ids, input_lengths):
        logits, k, v = self.model.forward_cached(prefix, input_ids, input_lengths, torch.zeros_like(input_lengths),
                                                 None, None)
        return (logits, *interleave(k, v))


class DecodeGraph(torch.nn.Module):
    def __init__(self, model: MultimodalGPT):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, *past):
        keys, values = _split_past(past)
        ones = torch.ones_like(position_ids[:, 0])
        logits, k, v = self.model.forward_cached(None, input_ids, ones, position_ids[:, 0], keys, values)
        return (logits, *interleave(k, v))


class ContextGenerationGraph(torch.nn.Module):
    def __init__(self, model: MultimodalGPT):
        super().__init__()
        self.model = model

    def forward(self, prefix, input_ids, input_lengths, position_ids, *past):
        keys, values = _split_past(past)
        logits, k, v = self.model.forward_cached(prefix, input_ids, input_lengths, position_ids[:, 0], keys, values)
        return (logits, *interleave(k, v))


@dataclass
class GraphSpec:
    name: str
    module: torch.nn.Module
    input_names: list[str]
    output_names: list[str]
    sample_inputs: tuple
    dynamic_shapes: dict
    # dims of each I/O tensor, symbolic names or ints: checked against the saved file
    contract: dict


def graph_specs(model: MultimodalGPT, dtype: torch.dtype, max_batch: int, max_prefix: int, max_text: int,
                max_cache: int) -> dict[str, GraphSpec]:
    cfg = model.config
    L, H, D, F, V = cfg.n_layer, cfg.n_head, cfg.head_dim, cfg.prefix_dim, cfg.vocab_size
    B, P, T, S = TRACE_BATCH, TRACE_PREFIX, TRACE_TEXT, TRACE_CACHE
    batch = Dim("batch", min=1, max=max_batch)
    text = Dim("text_len", min=1, max=max_text)
    cache = Dim("cache_len", min=1, max=max_cache)
    g = torch.Generator().manual_seed(0)

    def prefix(p):
        return torch.randn(B, p, F, generator=g).to(dtype)

    def ids(t):
        return torch.randint(0, 256, (B, t), generator=g)

    lengths = torch.tensor([T, 2])[:B]
    positions = torch.tensor([[4], [S - 1]])[:B]
    past = tuple(torch.randn(B, H, S, D, generator=g).to(dtype) for _ in range(2 * L))
    past_dyn = {n: {0: batch, 2: cache} for n in past_names(L)}
    kv_out = lambda seq: {n: ["batch", H, seq, D] for n in present_names(L)}  # noqa: E731
    past_contract = {n: ["batch", H, "cache_len", D] for n in past_names(L)}

    prefill = GraphSpec(
        "prefill", PrefillGraph(model), ["prefix", "input_ids", "input_lengths"], ["logits", *present_names(L)],
        (prefix(P), ids(T), lengths),
        {"prefix": {0: batch, 1: Dim("prefix_len", min=1, max=max_prefix)}, "input_ids": {0: batch, 1: text},
         "input_lengths": {0: batch}},
        {"prefix": ["batch", "prefix_len", F], "input_ids": ["batch", "text_len"], "input_lengths": ["batch"],
         "logits": ["batch", V], **kv_out("prefix_len + text_len")})
    decode = GraphSpec(
        "decode", DecodeGraph(model), ["input_ids", "position_ids", *past_names(L)], ["logits", *present_names(L)],
        (ids(1), positions, *past),
        {"input_ids": {0: batch}, "position_ids": {0: batch}, **past_dyn},
        {"input_ids": ["batch", 1], "position_ids": ["batch", 1], **past_contract, "logits": ["batch", V],
         **kv_out(1)})
    # Zero-length prefix (generation) and zero-length past (context) must be legal here: min=0.
    cache0 = Dim("cache_len", min=0, max=max_cache)
    context_generation = GraphSpec(
        "context_generation", ContextGenerationGraph(model),
        ["prefix", "input_ids", "input_lengths", "position_ids", *past_names(L)], ["logits", *present_names(L)],
        (prefix(P), ids(T), lengths, positions, *past),
        {"prefix": {0: batch, 1: Dim("prefix_len", min=0, max=max_prefix)}, "input_ids": {0: batch, 1: text},
         "input_lengths": {0: batch}, "position_ids": {0: batch},
         **{n: {0: batch, 2: cache0} for n in past_names(L)}},
        {"prefix": ["batch", "prefix_len", F], "input_ids": ["batch", "text_len"], "input_lengths": ["batch"],
         "position_ids": ["batch", 1], **past_contract, "logits": ["batch", V], **kv_out("prefix_len + text_len")})
    return {s.name: s for s in (prefill, decode, context_generation)}
