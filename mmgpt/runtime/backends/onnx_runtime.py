"""The ONNX Runtime backend: the exported prefill / decode graphs, on the CPU.

Inputs are handed to ONNX Runtime as NumPy views of the generator's torch buffers (no copies of the KV cache);
the decode graph returns the new token's keys and values, which are written into the cache at the position.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch

from mmgpt.contract.artifacts import Artifacts
from mmgpt.contract.graphs import context_feed, interleave, past_names
from mmgpt.runtime.backends import Backend, write_kv
from mmgpt.errors import UserError


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, artifacts: Artifacts, threads: int = 0):
        m = artifacts.manifest
        if m.dtype == "bfloat16":
            raise UserError("ONNX Runtime's CPU provider has no bfloat16 kernels; export with dtype=fp32 or fp16 "
                             "for backend=onnxruntime")
        super().__init__(m.dims, "cpu", m.torch_dtype, context_lens=m.context_lens)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        self.prefill_session = ort.InferenceSession(str(artifacts.graph_path("prefill")), opts, providers=providers)
        self.decode_session = ort.InferenceSession(str(artifacts.graph_path("decode")), opts, providers=providers)
        self._past_names = past_names(self.dims.n_layer)

    def prefill(self, context, input_ids, input_lengths):
        feed = {name: _np(t.to(self.dtype) if t.is_floating_point() else t)
                for name, t in context_feed(self.dims, context).items()}
        feed.update(input_ids=_np(input_ids), input_lengths=_np(input_lengths))
        outs = self.prefill_session.run(None, feed)
        logits, kv = torch.from_numpy(outs[0]), [torch.from_numpy(o) for o in outs[1:]]
        return logits, kv[0::2], kv[1::2]

    def decode(self, input_ids, position_ids, k_cache, v_cache):
        feed = {"input_ids": _np(input_ids), "position_ids": _np(position_ids)}
        feed.update(zip(self._past_names, map(_np, interleave(k_cache, v_cache))))
        outs = self.decode_session.run(None, feed)
        kv = [torch.from_numpy(o) for o in outs[1:]]
        write_kv(k_cache, kv[0::2], position_ids)
        write_kv(v_cache, kv[1::2], position_ids)
        return torch.from_numpy(outs[0])


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()
