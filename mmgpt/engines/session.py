"""The TensorRT runtime session the decode loop drives: the `tensorrt` backend.

Facts respected (DESIGN.md): one execution context per optimization profile; `set_optimization_profile_async`
before `set_input_shape`; every tensor gets a non-null address, empty ones too; `execute_async_v3` on the
caller's (non-default) stream, so the generator can capture it in a CUDA graph after its warm-up enqueue; inputs
and outputs never alias (the decode engine returns the new entries, which the runtime writes into the cache).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from mmgpt.engines.trt import import_runtime
from mmgpt.export.artifacts import Artifacts
from mmgpt.export.graphs import interleave, past_names, present_names
from mmgpt.runtime.backends import write_kv

class EngineError(RuntimeError):
    pass


def sidecar(engine_path: Path) -> Path:
    return engine_path.with_name(engine_path.name + ".json")


def check_engine_matches(artifacts: Artifacts, engine_path: Path) -> dict:
    """The engine's build record must name the weights model.json describes."""
    side = sidecar(engine_path)
    if not side.is_file():
        raise EngineError(f"{engine_path}: no build record {side.name} beside it; rebuild with `python export.py`")
    record = json.loads(side.read_text())
    if record.get("weights_sha256") != artifacts.meta["weights_sha256"]:
        raise EngineError(f"{engine_path.name} was built from other weights (sha256 {record.get('weights_sha256', '?')[:12]}"
                          f"… vs model.json {artifacts.meta['weights_sha256'][:12]}…); rebuild it with "
                          f"`python export.py ckpt={artifacts.meta['checkpoint']}`")
    return record


def cannot_run_message(runtime: str, err: str) -> str:
    major, minor = torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    if runtime == "tensorrt_rtx":
        return (f"TensorRT-RTX cannot run this engine on {gpu} (compute capability {major}.{minor}): it targets RTX "
                "and Ampere-class GPUs. On H100 / H200 / B200 use full TensorRT: `pip install tensorrt-cu13`, then "
                "`python export.py engine=tensorrt`; or run `python infer.py backend=torch`. "
                f"(TensorRT said: {err})")
    return (f"TensorRT could not load the engine on {gpu} (compute capability {major}.{minor}); engines only run on "
            "the GPU architecture and TensorRT version they were built with: rebuild with `python export.py` on this "
            f"machine, or run `python infer.py backend=torch`. (TensorRT said: {err})")


class _CapturingLogger:
    """Keeps TensorRT's error lines so a failed deserialization can say why."""

    def __init__(self, trt):
        self.errors: list[str] = []
        outer = self

        class Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)

            def log(self, severity, msg):
                if severity <= trt.ILogger.Severity.ERROR:
                    outer.errors.append(msg)
        self.logger = Logger()


class EngineSession:
    """One deserialized engine and its contexts, one per optimization profile."""

    def __init__(self, engine_path: Path, runtime: str):
        self.trt = trt = import_runtime(runtime)
        if not torch.cuda.is_available():
            raise EngineError(f"{engine_path.name}: executing a TensorRT engine needs a CUDA GPU; this machine has "
                              "none. Use backend=onnxruntime (CPU) instead")
        capture = _CapturingLogger(trt)
        self._logger = capture.logger  # TensorRT keeps only a reference: the logger must outlive the runtime
        self.runtime = trt.Runtime(capture.logger)
        self.engine = self.runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise EngineError(cannot_run_message(runtime, " | ".join(capture.errors[-3:]) or "no reason given"))
        self.contexts = []
        for _ in range(self.engine.num_optimization_profiles):
            ctx = self.engine.create_execution_context()
            if ctx is None:
                raise EngineError(f"{engine_path.name}: could not create an execution context (out of GPU memory?)")
            self.contexts.append(ctx)
        self._profile_set = [False] * len(self.contexts)
        self._placeholder = torch.zeros(16, dtype=torch.uint8, device="cuda")  # non-null address for empty tensors

    def max_shape(self, name: str, profile: int = 0):
        return tuple(self.engine.get_tensor_profile_shape(name, profile)[2])

    def run(self, profile: int, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        ctx = self.contexts[profile]
        stream = torch.cuda.current_stream().cuda_stream
        if not self._profile_set[profile]:
            ctx.set_optimization_profile_async(profile, stream)  # before any set_input_shape
            self._profile_set[profile] = True
        for name, t in inputs.items():
            if not ctx.set_input_shape(name, tuple(t.shape)):
                raise EngineError(f"input {name} shape {tuple(t.shape)} lies outside the engine's profile {profile} "
                                  f"(max {self.max_shape(name, profile)}); rebuild with wider engine.profiles")
        for name, t in {**inputs, **outputs}.items():
            ctx.set_tensor_address(name, t.data_ptr() if t.numel() else self._placeholder.data_ptr())
        if not ctx.execute_async_v3(stream):
            raise EngineError("TensorRT execute_async_v3 failed; the TensorRT log above says why")


class TensorRTBackend:
    """prefill / decode through the engines of one strategy (two_engines or shared)."""

    name = "tensorrt"

    def __init__(self, artifacts: Artifacts, strategy: str | None = None):
        engines = artifacts.meta.get("engines") or {}
        if not engines:
            raise EngineError(f"{artifacts.path}: no engines were built; run `python export.py engine=tensorrt`")
        strategy = strategy or ("shared" if "shared" in engines else next(iter(engines)))
        if strategy not in engines:
            raise EngineError(f"{artifacts.path}: no '{strategy}' engines; built: {sorted(engines)}")
        entry = engines[strategy]
        meta, cfg = artifacts.meta, artifacts.meta["model_config"]
        self.strategy, self.runtime = strategy, entry["runtime"]
        self.device, self.dtype = torch.device("cuda"), artifacts.torch_dtype
        self.n_layer, self.n_head, self.head_dim = cfg["n_layer"], cfg["n_head"], cfg["n_embd"] // cfg["n_head"]
        self.prefix_len, self.prefix_dim, self.vocab = meta["prefix_len"], cfg["prefix_dim"], cfg["vocab_size"]
        paths = {name: artifacts.path / e["file"] for name, e in entry["engines"].items()}
        for path in paths.values():  # refuse foreign weights before loading anything
            check_engine_matches(artifacts, path)
        self.sessions = {name: EngineSession(path, self.runtime) for name, path in paths.items()}
        if strategy == "shared":
            self._prefill = (self.sessions["shared"], 0)  # context profile
            self._decode = (self.sessions["shared"], 1)  # generation profile
        else:
            self._prefill, self._decode = (self.sessions["prefill"], 0), (self.sessions["decode"], 0)
        self.max_batch = self._prefill[0].max_shape("input_ids", self._prefill[1])[0]
        self._empty = {}

    def _zeros(self, shape, dtype):
        return torch.zeros(shape, dtype=dtype, device=self.device)

    def prefill(self, prefix, input_ids, input_lengths):
        B, P, T = input_ids.shape[0], prefix.shape[1], input_ids.shape[1]
        inputs = {"prefix": prefix.to(self.device, self.dtype).contiguous(), "input_ids": input_ids.contiguous(),
                  "input_lengths": input_lengths.contiguous()}
        session, profile = self._prefill
        if self.strategy == "shared":  # the context profile: past of length 0, positions from 0
            inputs["position_ids"] = self._zeros((B, 1), torch.long)
            for n in past_names(self.n_layer):
                inputs[n] = self._zeros((B, self.n_head, 0, self.head_dim), self.dtype)
        outputs = {"logits": self._zeros((B, self.vocab), self.dtype)}
        kv = [self._zeros((B, self.n_head, P + T, self.head_dim), self.dtype) for _ in range(2 * self.n_layer)]
        outputs.update(zip(present_names(self.n_layer), kv))
        session.run(profile, inputs, outputs)
        return outputs["logits"], kv[0::2], kv[1::2]

    def decode(self, input_ids, position_ids, k_cache, v_cache):
        B = input_ids.shape[0]
        session, profile = self._decode
        key = (B, k_cache.shape[3])
        if key not in self._empty:  # outputs and empty inputs allocated once per bucket: graph-capture safe
            new = [self._zeros((B, self.n_head, 1, self.head_dim), self.dtype) for _ in range(2 * self.n_layer)]
            logits = self._zeros((B, self.vocab), self.dtype)
            extra = {}
            if self.strategy == "shared":  # the generation profile: no prefix, one token
                extra = {"prefix": self._zeros((B, 0, self.prefix_dim), self.dtype),
                         "input_lengths": torch.ones(B, dtype=torch.long, device=self.device)}
            self._empty[key] = (new, logits, extra)
        new, logits, extra = self._empty[key]
        inputs = {"input_ids": input_ids, "position_ids": position_ids, **extra,
                  **dict(zip(past_names(self.n_layer), interleave(k_cache, v_cache)))}
        session.run(profile, inputs, {"logits": logits, **dict(zip(present_names(self.n_layer), new))})
        write_kv(k_cache, new[0::2], position_ids)
        write_kv(v_cache, new[1::2], position_ids)
        return logits
