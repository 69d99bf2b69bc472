"""The `tensorrt` backend: the engines of one strategy (two_engines or shared), driven so that the generator can
capture each decode step in a CUDA graph.

The call protocol, from TensorRT's developer guide and headers, TensorRT-RTX's "Working with CUDA Graphs", trtexec
and TensorRT-LLM's runtime:
- One device-memory block (USER_MANAGED allocation) sized for the largest profile, shared by every execution
  context. Sharing is safe because all contexts run on one stream, one after another.
- Prefill: one context on the context profile; its shapes change per call and it is never captured.
- Decode: one context per binding set (batch, capacity and the generator's buffers). A captured graph replays
  its context's shapes, addresses and activation memory, so a context is never re-shaped once it has run.
- Per context: device memory and `set_optimization_profile_async` first, then `set_input_shape`, then
  `set_tensor_address`; every tensor gets a distinct non-null 256-byte-aligned address, empty tensors too.
- `execute_async_v3` on the caller's stream, never the legacy default stream (the generator owns a stream).
- TensorRT-RTX: engines are built with REQUIRE_USER_ALLOCATION (stream capture needs it); contexts come from a
  runtime config with USER_MANAGED allocation, RTX's own graph capture disabled (the generator captures) and
  EAGER kernel specialization (LAZY swaps kernels in after a first run, under a graph that captured the fallback).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mmgpt.contract.artifacts import Artifacts
from mmgpt.contract.graphs import BATCH, CACHE, MODEL_DTYPE, PROMPT, GraphDecl, context_feed, context_inputs, \
    declare_graphs, interleave, past_names
from mmgpt.contract.engines import EngineBuild, EngineFile
from mmgpt.engines.trt import EngineError, TrtLog, import_runtime, is_rtx
from mmgpt.runtime.backends import Backend, write_kv

ALIGNMENT = 256  # bytes: what setTensorAddress and setDeviceMemory require


def check_engine_record(artifacts: Artifacts, build: EngineBuild, engine: EngineFile) -> Path:
    """The engine file must be the one its build record describes, built from the weights the manifest names."""
    path = artifacts.path / engine.file
    rebuild = f"rebuild the engines on this machine: `python export.py artifacts={artifacts.path} engine=tensorrt`"
    if not path.is_file():
        raise EngineError(f"{path}: missing, though model.json records it; {rebuild}")
    if path.stat().st_size != engine.bytes:
        raise EngineError(f"{path}: {path.stat().st_size} bytes, but model.json records the engine built as "
                          f"{engine.bytes} bytes: the file was replaced after the build; {rebuild}")
    want = artifacts.manifest.weights.sha256_tree
    if build.weights_sha256_tree != want:
        raise EngineError(f"{engine.file} was built from other weights (hash {build.weights_sha256_tree[:12]}… vs "
                          f"model.json {want[:12]}…); {rebuild}")
    return path


def cannot_run_message(runtime: str, err: str) -> str:
    major, minor = torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    if runtime == "tensorrt_rtx":
        return (f"TensorRT-RTX cannot run this engine on {gpu} (compute capability {major}.{minor}): it targets RTX "
                "and Ampere-class GPUs. On H100 / H200 / B200 use full TensorRT: `pip install tensorrt-cu13`, then "
                "`python export.py artifacts=<dir> engine=tensorrt`; or run `python infer.py backend=torch-triton`. "
                f"(TensorRT said: {err})")
    return (f"TensorRT could not load the engine on {gpu} (compute capability {major}.{minor}); engines only run on "
            "the GPU architecture and TensorRT version they were built with: rebuild them on this machine with "
            f"`python export.py artifacts=<dir> engine=tensorrt`, or run `python infer.py backend=torch-triton`. "
            f"(TensorRT said: {err})")


def current_stream_handle(device: torch.device) -> int:
    """The caller's CUDA stream; TensorRT must not run on the legacy default stream (it adds synchronisations
    and cannot be captured)."""
    handle = torch.cuda.current_stream(device).cuda_stream
    if handle == 0:
        raise EngineError("TensorRT engines must run on a non-default CUDA stream: call the backend inside "
                          "`with torch.cuda.stream(torch.cuda.Stream()):` (mmgpt's Generator does this)")
    return handle


@dataclass(frozen=True)
class Flow:
    """One way the engines are called: the engine session, its optimization profile and the graph it was built
    from. `context` (prefill) and `generation` (decode) are named by their profiles, whatever the strategy."""
    name: str
    session: "EngineSession"
    profile: int  # TensorRT's index of the profile in its engine
    graph: GraphDecl


@dataclass
class _Binding:
    """One execution context with its shapes and addresses set once, and the tensors it writes."""
    context: object
    outputs: dict[str, torch.Tensor]
    keep: tuple  # inputs the backend made for this binding, alive as long as the context may read them


class EngineSession:
    """One deserialized engine."""

    def __init__(self, trt, engine_path: Path, runtime: str, log: TrtLog):
        self.trt, self.path, self.log = trt, engine_path, log
        self.runtime = trt.Runtime(log.logger)  # the runtime must outlive its engine
        self.engine = self.runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise EngineError(cannot_run_message(runtime, log.take_errors() or "no reason given"))
        self.runtime_config = None
        if is_rtx(trt):
            rc = self.engine.create_runtime_config()
            rc.set_execution_context_allocation_strategy(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            rc.cuda_graph_strategy = trt.CudaGraphStrategy.DISABLED
            rc.dynamic_shapes_kernel_specialization_strategy = trt.DynamicShapesKernelSpecializationStrategy.EAGER
            self.runtime_config = rc

    def memory_size(self) -> int:
        return max(self.engine.get_device_memory_size_for_profile_v2(p)
                   for p in range(self.engine.num_optimization_profiles))

    def max_shape(self, name: str, profile: int) -> tuple:
        return tuple(self.engine.get_tensor_profile_shape(name, profile)[2])

    def new_context(self, profile: int, memory: torch.Tensor, stream: int):
        if self.runtime_config is not None:
            ctx = self.engine.create_execution_context(self.runtime_config)
        else:
            ctx = self.engine.create_execution_context(self.trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if ctx is None:
            raise EngineError(f"{self.path.name}: could not create an execution context: {self.log.take_errors()}")
        ctx.set_device_memory(memory.data_ptr(), memory.numel())
        if not ctx.set_optimization_profile_async(profile, stream):  # before any set_input_shape
            raise EngineError(f"{self.path.name}: could not select profile {profile}: {self.log.take_errors()}")
        return ctx


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, artifacts: Artifacts, strategy: str | None = None, device="cuda", trt=None):
        m = artifacts.manifest
        if not m.engines:
            raise EngineError(f"{artifacts.path}: no engines were built; build them on this machine: "
                              f"`python export.py artifacts={artifacts.path} engine=tensorrt`")
        strategy = strategy or ("shared" if "shared" in m.engines else next(iter(m.engines)))
        if strategy not in m.engines:
            raise EngineError(f"{artifacts.path}: no '{strategy}' engines; built: {sorted(m.engines)}")
        build = m.engines[strategy]
        device = torch.device(device)
        if device.type != "cuda" and trt is None:
            raise EngineError("executing a TensorRT engine needs a CUDA GPU; this machine has none. Use "
                              "backend=onnxruntime (CPU) instead")
        super().__init__(m.dims, device, m.torch_dtype, context_lens=m.context_lens)
        self.strategy, self.runtime = strategy, build.runtime
        self.context_past = build.context_past_slots
        paths = {name: check_engine_record(artifacts, build, e) for name, e in build.engines.items()}  # before any load
        self.trt = trt or import_runtime(self.runtime)
        self.log = TrtLog(self.trt)
        self.sessions = {name: EngineSession(self.trt, path, self.runtime, self.log) for name, path in paths.items()}
        graphs = declare_graphs(self.dims)
        flows = {profile: Flow(profile, self.sessions[name], index, graphs[e.source])
                 for name, e in build.engines.items() for index, profile in enumerate(e.profile_names)}
        self.prefill_flow, self.decode_flow = flows["context"], flows["generation"]
        self.max_batch = self.prefill_flow.session.max_shape("input_ids", self.prefill_flow.profile)[0]
        # one activation block for every context: they all run on one stream, one after another
        size = max(s.memory_size() for s in self.sessions.values())
        self._memory = torch.empty(max(size, ALIGNMENT), dtype=torch.uint8, device=self.device)
        self._empty_slots: dict[str, torch.Tensor] = {}
        self._prefill_context = None
        self._decode_bindings: dict[tuple, _Binding] = {}

    # ---------------------------------------------------------------- addresses
    def _address(self, name: str, t: torch.Tensor) -> int:
        if t.numel() == 0:  # a distinct, non-null, aligned address per empty tensor, as the developer guide asks
            if name not in self._empty_slots:
                self._empty_slots[name] = torch.empty(2 * ALIGNMENT, dtype=torch.uint8, device=self.device)
            ptr = self._empty_slots[name].data_ptr()
            return ptr + (-ptr) % ALIGNMENT
        if self.device.type == "cuda" and t.data_ptr() % ALIGNMENT:
            raise EngineError(f"tensor {name} is not {ALIGNMENT}-byte aligned (address {t.data_ptr():#x}); "
                              "TensorRT requires it: pass a tensor of its own, not a view at an offset")
        return t.data_ptr()

    def _bind(self, flow: Flow, context, inputs: dict, outputs: dict) -> None:
        for name, t in inputs.items():
            if not context.set_input_shape(name, tuple(t.shape)):
                raise EngineError(f"input {name} of shape {tuple(t.shape)} lies outside the {flow.name} profile of "
                                  f"{flow.session.path.name} (max {flow.session.max_shape(name, flow.profile)}); "
                                  f"rebuild with wider engine.profiles. {self.log.take_errors()}")
        for name, t in {**inputs, **outputs}.items():
            context.set_tensor_address(name, self._address(name, t))

    def _execute(self, context, stream: int) -> None:
        if not context.execute_async_v3(stream):
            raise EngineError(f"TensorRT execute_async_v3 failed: {self.log.take_errors() or 'no reason given'}")

    def _outputs(self, graph: GraphDecl, sizes: dict) -> dict[str, torch.Tensor]:
        """Output buffers shaped by the graph declaration; TensorRT writes every element (no zero fill)."""
        return {t.name: torch.empty(t.shape(sizes), dtype=self.dtype, device=self.device) for t in graph.outputs}

    # ---------------------------------------------------------------- the two flows
    def prefill(self, context, input_ids, input_lengths):
        flow = self.prefill_flow
        stream = current_stream_handle(self.device)
        B, T = input_ids.shape
        inputs = {name: t.to(self.device, self.dtype if t.is_floating_point() else t.dtype).contiguous()
                  for name, t in context_feed(self.dims, context).items()}
        inputs.update(input_ids=input_ids.contiguous(), input_lengths=input_lengths.contiguous())
        lengths = {sym: inputs[decls[0].name].shape[1]
                   for sym, decls in zip(self.dims.context_symbols, map(context_inputs, self.dims.context))}
        if self.strategy == "shared":  # the context profile: positions from 0, an empty (or one masked) past
            inputs["position_ids"] = torch.zeros((B, 1), dtype=torch.long, device=self.device)
            S = self.context_past
            past = [torch.zeros((B, self.dims.n_kv_head, S, self.dims.head_dim), dtype=self.dtype, device=self.device)
                    for _ in range(2 * self.dims.n_layer)]
            inputs.update(zip(past_names(self.dims.n_layer), past))
        outputs = self._outputs(flow.graph, {BATCH: B, **lengths, PROMPT: T, CACHE: 0})
        if self._prefill_context is None:
            self._prefill_context = flow.session.new_context(flow.profile, self._memory, stream)
        self._bind(flow, self._prefill_context, inputs, outputs)
        self._execute(self._prefill_context, stream)
        kv = list(outputs.values())[1:]
        return outputs["logits"], kv[0::2], kv[1::2]

    def _decode_binding(self, input_ids, position_ids, k_cache, v_cache, stream: int) -> _Binding:
        key = (input_ids.shape[0], k_cache.shape[3], input_ids.data_ptr(), position_ids.data_ptr(),
               k_cache.data_ptr(), v_cache.data_ptr())
        if key not in self._decode_bindings:
            flow = self.decode_flow
            B, S = key[:2]
            inputs = {"input_ids": input_ids, "position_ids": position_ids}
            keep = ()
            no_context = {sym: 0 for sym in self.dims.context_symbols}
            if self.strategy == "shared":  # the generation profile: an empty context, one token
                sizes = {BATCH: B, **no_context}
                empty = {t.name: torch.zeros(t.shape(sizes), device=self.device,
                                             dtype=self.dtype if t.dtype == MODEL_DTYPE else torch.long)
                         for m in self.dims.context for t in context_inputs(m)}
                keep = (*empty.values(), torch.ones(B, dtype=torch.long, device=self.device))
                inputs.update(empty, input_lengths=keep[-1])
            inputs.update(zip(past_names(self.dims.n_layer), interleave(k_cache.unbind(0), v_cache.unbind(0))))
            outputs = self._outputs(flow.graph, {BATCH: B, **no_context, PROMPT: 1, CACHE: S})
            context = flow.session.new_context(flow.profile, self._memory, stream)
            self._bind(flow, context, inputs, outputs)
            self._decode_bindings[key] = _Binding(context, outputs, keep)
        return self._decode_bindings[key]

    def decode(self, input_ids, position_ids, k_cache, v_cache):
        stream = current_stream_handle(self.device)
        binding = self._decode_binding(input_ids, position_ids, k_cache, v_cache, stream)
        self._execute(binding.context, stream)
        new = list(binding.outputs.values())[1:]
        write_kv(k_cache, new[0::2], position_ids)
        write_kv(v_cache, new[1::2], position_ids)
        return binding.outputs["logits"]

    def capture_blocker(self, input_ids, position_ids, k_cache, v_cache) -> str | None:
        """Why this decode binding cannot be captured in a CUDA graph, or None. TensorRT-RTX answers for its
        engine; full TensorRT has no such query (a failed capture is caught by the generator instead)."""
        stream = current_stream_handle(self.device)
        binding = self._decode_binding(input_ids, position_ids, k_cache, v_cache, stream)
        check = getattr(binding.context, "is_stream_capturable", None)
        if check is not None and not check(stream):
            return f"TensorRT-RTX reports this engine is not stream capturable: {self.log.take_errors()}"
        return None
