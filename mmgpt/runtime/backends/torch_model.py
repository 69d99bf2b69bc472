"""The PyTorch model itself as a backend; `compile=True` fuses each decode step (KV write included) with
torch.compile. Training validation and every exported graph run the same `forward_cached`."""
from __future__ import annotations

import torch

from mmgpt.contract.graphs import ModelDims
from mmgpt.model import MultimodalGPT
from mmgpt.runtime.backends import Backend, write_kv


class TorchBackend(Backend):
    name = "torch"
    prefill_capturable = True

    def __init__(self, model: MultimodalGPT, compile: bool = False, context_lens: dict[str, int] | None = None):
        p = next(model.parameters())
        super().__init__(ModelDims.of(model.config), p.device, p.dtype, context_lens=context_lens)
        self.model = model.eval()
        self._decode = torch.compile(self._decode_step, fullgraph=True, dynamic=False) if compile else self._decode_step
        if compile:
            self.name = "torch-compile"

    @torch.no_grad()
    def prefill(self, context, input_ids, input_lengths):
        start = torch.zeros_like(input_lengths)
        return self.model.forward_cached(context, input_ids, input_lengths, start, None, None)

    @torch.no_grad()
    def prefill_after(self, past_keys, past_values, input_ids, input_lengths):
        """A prompt after a context whose keys and values are known (per layer (B, H, P, D), e.g. from a prefix
        cache) -> logits (B, V) at each row's last real token, and the prompt's keys and values (B, H, T, D)."""
        start = torch.full_like(input_lengths, past_keys[0].shape[2])
        return self.model.forward_cached(None, input_ids, input_lengths, start, past_keys, past_values)

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
