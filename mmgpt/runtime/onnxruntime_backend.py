"""The ONNX Runtime backend: the exported prefill / decode graphs, on the CPU.

Inputs are handed to ONNX Runtime as NumPy views of the generator's torch buffers (no copies of the KV cache);
the decode graph returns the new token's keys and values, which are written into the cache at the position.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch

from mmgpt.export.artifacts import Artifacts
from mmgpt.export.graphs import interleave, past_names
from mmgpt.runtime.backends import write_kv

class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, artifacts: Artifacts, threads: int = 0):
        meta = artifacts.meta
        if meta["dtype"] == "bfloat16":
            raise ValueError("ONNX Runtime's CPU provider has no bfloat16 kernels; export with dtype=fp32 or fp16 "
                             "for backend=onnxruntime")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        self.prefill_session = ort.InferenceSession(str(artifacts.graph_path("prefill")), opts, providers=providers)
        self.decode_session = ort.InferenceSession(str(artifacts.graph_path("decode")), opts, providers=providers)
        cfg = meta["model_config"]
        self.device, self.dtype = torch.device("cpu"), artifacts.torch_dtype
        self.n_layer, self.n_head = cfg["n_layer"], cfg["n_head"]
        self.head_dim = cfg["n_embd"] // cfg["n_head"]
        self.prefix_len, self.prefix_dim = meta.get("prefix_len"), cfg["prefix_dim"]
        self.max_batch = None
        self._past_names = past_names(self.n_layer)

    def prefill(self, prefix, input_ids, input_lengths):
        outs = self.prefill_session.run(None, {
            "prefix": _np(prefix.to(self.dtype)), "input_ids": _np(input_ids), "input_lengths": _np(input_lengths)})
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
