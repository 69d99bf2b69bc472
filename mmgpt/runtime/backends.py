"""The small interface every backend implements, and the PyTorch backend.

A backend runs the two graphs of DESIGN.md:
  prefill(prefix, input_ids, input_lengths) -> logits (B, V), keys / values per layer (B, H, P+T, D)
  decode(input_ids (B, 1), position_ids (B, 1), k_cache, v_cache) -> logits (B, V)
The caches are (L, B, H, S, D) buffers owned by the generator; decode writes the new token's key and value into
them at position_ids (inside the backend, so the PyTorch backend can fuse the write into its compiled step).
"""
from __future__ import annotations

from typing import Protocol

import torch

from mmgpt.model import MultimodalGPT


class Backend(Protocol):
    name: str
    device: torch.device
    dtype: torch.dtype  # KV cache dtype
    n_layer: int
    n_head: int
    head_dim: int
    prefix_len: int | None  # fixed P of the exported graphs, or None where any P works
    prefix_dim: int
    max_batch: int | None  # largest batch the engine profile takes, or None

    def prefill(self, prefix, input_ids, input_lengths): ...

    def decode(self, input_ids, position_ids, k_cache, v_cache) -> torch.Tensor: ...


def write_kv(cache: torch.Tensor, new: list[torch.Tensor] | torch.Tensor, position_ids: torch.Tensor) -> None:
    """cache (L, B, H, S, D) <- new entries (L x (B, H, 1, D)) at each row's position (B, 1), in place."""
    new = torch.stack(list(new)) if not torch.is_tensor(new) else new  # (L, B, H, 1, D)
    L, B, H, _, D = new.shape
    index = position_ids.view(1, B, 1, 1, 1).expand(L, B, H, 1, D)
    cache.scatter_(3, index, new.to(cache.dtype))


class TorchBackend:
    """The PyTorch model itself; `compile=True` fuses each decode step (KV write included) with torch.compile."""

    name = "torch"

    def __init__(self, model: MultimodalGPT, compile: bool = False, prefix_len: int | None = None):
        self.model = model.eval()
        cfg = model.config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.n_layer, self.n_head, self.head_dim = cfg.n_layer, cfg.n_head, cfg.head_dim
        self.prefix_len, self.prefix_dim, self.max_batch = prefix_len, cfg.prefix_dim, None
        self.compiled = compile
        self._decode = torch.compile(self._decode_step, fullgraph=True, dynamic=False) if compile else self._decode_step
        if compile:
            self.name = "torch-compile"

    @torch.no_grad()
    def prefill(self, prefix, input_ids, input_lengths):
        start = torch.zeros_like(input_lengths)
        return self.model.forward_cached(prefix.to(self.dtype), input_ids, input_lengths, start, None, None)

    def decode(self, input_ids, position_ids, k_cache, v_cache):
        with torch.no_grad():
            return self._decode(input_ids, position_ids, k_cache, v_cache)

    def _decode_step(self, input_ids, position_ids, k_cache, v_cache):
        ones = torch.ones_like(position_ids[:, 0])
        logits, new_k, new_v = self.model.forward_cached(
            None, input_ids, ones, position_ids[:, 0], k_cache.unbind(0), v_cache.unbind(0))
        write_kv(k_cache, new_k, position_ids)
        write_kv(v_cache, new_v, position_ids)
        return logits
