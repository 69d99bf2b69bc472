"""The TensorRT backend's call protocol, pinned without a GPU: a recording stand-in for TensorRT's runtime API (the
real method names, recording the order of calls) drives the generator the way a real engine would.

What the protocol must hold (TensorRT developer guide; TensorRT-RTX "Working with CUDA Graphs"; trtexec):
one execution context per decode bucket, never re-shaped (a captured graph replays its context's shapes); device
memory and the profile set before any input shape; a distinct non-null address for every empty tensor; a
non-default stream; TensorRT's own error lines in every error. The stand-in also writes every output it is bound
to (a pattern that names the output, the row and the cache slot), so the mapping of each engine output to its cache
slot and the logits that reach the generator are checked too.
"""
import ctypes
import enum
import json
import shutil
import types

import pytest
import torch

import mmgpt.runtime.backends.tensorrt_engines as engines_backend
from mmgpt.contract.artifacts import Artifacts
from mmgpt.contract.engines import ENGINES, EngineBuild, EngineConfig, EngineFile
from mmgpt.contract.graphs import BATCH, CACHE, PROMPT, declare_graphs, length_symbol
from mmgpt.engines.build import profile_shapes, profile_sizes
from mmgpt.engines.trt import EngineError
from mmgpt.runtime.backends.tensorrt_engines import TensorRTBackend, current_stream_handle
from mmgpt.runtime.generator import Generator

IMAGE = length_symbol("image")


def image_len(artifacts) -> int:
    return artifacts.manifest.context_lens["image"]

STREAM = 7  # what the stand-in's "current stream" is


class Severity(enum.IntEnum):
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)


def at(address: int, shape, dtype) -> torch.Tensor:
    """The tensor at a bound address (the stand-in runs on the CPU, where an address is a host pointer)."""
    n = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
    return torch.frombuffer((ctypes.c_char * n).from_address(address), dtype=dtype).view(shape)


def kv_code(name: str) -> float:
    """What the stand-in writes into present.{layer}.{key|value}, before the slot and row are added."""
    _, layer, kv = name.split(".")
    return 1000.0 * int(layer) + (500.0 if kv == "value" else 0.0)


def next_token(position: int) -> int:
    """The token the stand-in's decode logits pick for a row at `position`: printable bytes, never EOS."""
    return 32 + position % 64


FIRST_TOKEN = 65  # the prefill logits' pick, plus the row index


class FakeContext:
    def __init__(self, engine, strategy, calls):
        self.engine, self.calls, self.strategy = engine, calls, strategy
        self.shapes, self.addresses, self.profile = {}, {}, None

    def write_outputs(self):
        """Fill every output as an engine would: present.* with kv_code + slot + row / 4 at each slot it covers
        (prefill: slots 0.., decode: the row's position), logits one-hot at the token the flow picks."""
        graph, shapes = self.engine.graph, self.shapes
        B, T = shapes["input_ids"]
        sizes = {BATCH: B, PROMPT: T, IMAGE: shapes.get("image_features", (0, 0))[1],
                 CACHE: shapes.get("past_key_values.0.key", (0, 0, 0))[2]}
        decoding = T == 1 and sizes[IMAGE] == 0 and "position_ids" in shapes and sizes[CACHE] > 0
        rows = torch.arange(B, dtype=torch.float32) / 4
        if decoding:
            positions = at(self.addresses["position_ids"], (B, 1), torch.long)[:, 0].clone()
        for t in graph.outputs:
            out = at(self.addresses[t.name], t.shape(sizes), torch.float32)
            if t.name == "logits":
                out.zero_()
                picks = [next_token(int(p)) for p in positions] if decoding else [FIRST_TOKEN + b for b in range(B)]
                out[torch.arange(B), torch.tensor(picks)] = 1.0
            else:
                slots = positions.float() if decoding else torch.arange(out.shape[2], dtype=torch.float32)
                value = kv_code(t.name) + (slots.view(B, 1, 1) if decoding else slots.view(1, -1, 1)) \
                    + rows.view(B, 1, 1)
                out.copy_(value.unsqueeze(1).expand(out.shape))

    def _record(self, *call):
        self.calls.append((id(self), *call))

    def set_device_memory(self, ptr, size):
        self._record("set_device_memory", ptr, size)

    def set_optimization_profile_async(self, profile, stream):
        self._record("set_optimization_profile_async", profile, stream)
        self.profile = profile
        return True

    def set_input_shape(self, name, shape):
        self._record("set_input_shape", name, tuple(shape))
        lo, _, hi = self.engine.profiles[self.profile][name]
        ok = len(shape) == len(lo) and all(a <= s <= b for a, s, b in zip(lo, shape, hi))
        if ok:
            self.shapes[name] = tuple(shape)
        return ok

    def set_tensor_address(self, name, ptr):
        self._record("set_tensor_address", name, ptr)
        self.addresses[name] = ptr

    def execute_async_v3(self, stream):
        self._record("execute_async_v3", stream, dict(self.shapes))
        if self.engine.fail_next:
            self.engine.fail_next = False
            self.engine.logger.log(Severity.ERROR, "IExecutionContext::enqueueV3: illegal memory access (fake)")
            return False
        self.write_outputs()
        return True


class FakeEngine:
    def __init__(self, graph, profiles, logger, calls, rtx):
        self.graph, self.profiles, self.logger, self.calls, self.rtx = graph, profiles, logger, calls, rtx
        self.num_optimization_profiles = len(profiles)
        self.fail_next = False
        self.contexts = []

    def get_device_memory_size_for_profile_v2(self, p):
        return 4096 * (p + 1)

    def get_tensor_profile_shape(self, name, p):
        return self.profiles[p][name]

    def create_runtime_config(self):
        assert self.rtx, "only TensorRT-RTX engines have runtime configs"
        return types.SimpleNamespace(
            set_execution_context_allocation_strategy=lambda s: setattr(self, "rtx_allocation", s))

    def create_execution_context(self, strategy):
        if self.rtx:  # TensorRT-RTX: the runtime config carries the allocation strategy and the capture settings
            assert strategy.cuda_graph_strategy == "DISABLED" and \
                strategy.dynamic_shapes_kernel_specialization_strategy == "EAGER"
            strategy = self.rtx_allocation
        assert strategy == fake_trt().ExecutionContextAllocationStrategy.USER_MANAGED
        ctx = FakeContext(self, strategy, self.calls)
        self.contexts.append(ctx)
        return ctx


def fake_trt(calls=None, engines=None, graphs=None, name="tensorrt"):
    """A stand-in for the `tensorrt` (or `tensorrt_rtx`) module: what the backend touches, nothing else."""
    class ILogger:
        Severity = Severity

        def __init__(self):
            pass

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, blob):
            spec = json.loads(blob)
            profiles = [{n: [tuple(s) for s in mom] for n, mom in p.items()} for p in spec["profiles"]]
            engine = FakeEngine(graphs[spec["source"]], profiles, self.logger, calls, rtx=name == "tensorrt_rtx")
            engines.append(engine)
            return engine

    return types.SimpleNamespace(
        __name__=name, __version__="10.99.fake", ILogger=ILogger, Runtime=Runtime,
        ExecutionContextAllocationStrategy=types.SimpleNamespace(STATIC=0, ON_PROFILE_CHANGE=1, USER_MANAGED=2),
        CudaGraphStrategy=types.SimpleNamespace(DISABLED="DISABLED", WHOLE_GRAPH_CAPTURE="WHOLE"),
        DynamicShapesKernelSpecializationStrategy=types.SimpleNamespace(LAZY="LAZY", EAGER="EAGER"))


def write_stand_in_engines(artifacts: Artifacts, runtime: str) -> None:
    """'Engines' the stand-in loads, with their profiles as the real build computes them, recorded in model.json
    through the same typed build record the real build writes."""
    cfg = EngineConfig.defaults(profiles={"batch": [1, 2, 8], "prompt": [1, 4, 32], "capacity": [64, 128, 128]})
    sizes = profile_sizes(artifacts, cfg)
    graphs = declare_graphs(artifacts.manifest.dims)
    for strategy, engines in ENGINES.items():
        built = {}
        for name, (graph, profile_names) in engines.items():
            profiles = {p: profile_shapes(graphs[graph], sizes[p]) for p in profile_names}
            path = artifacts.path / f"{name}.engine"
            path.write_text(json.dumps({"source": graph, "profiles": list(profiles.values())}))
            built[name] = EngineFile(file=path.name, bytes=path.stat().st_size, source=graph, io={},
                                     profiles=profiles, builder_weights_bytes=None, build_s=0.0)
        artifacts.record_engines(strategy, EngineBuild(
            strategy=strategy, runtime=runtime, version="10.99.fake",
            weights_sha256_tree=artifacts.manifest.weights.sha256_tree, target="stand-in", context_past_slots=0,
            config=cfg.replace(strategy=strategy), engines=built))


@pytest.fixture(params=["tensorrt"])
def stand_in(exported, tmp_path, monkeypatch, request):
    path = tmp_path / "digits"
    shutil.copytree(exported, path)
    write_stand_in_engines(Artifacts.open(path), request.param)
    artifacts = Artifacts.open(path)  # the record as read back from model.json
    calls, engines = [], []
    monkeypatch.setattr(engines_backend, "current_stream_handle", lambda device: STREAM)
    return artifacts, fake_trt(calls, engines, declare_graphs(artifacts.manifest.dims), request.param), calls, \
        engines


def _generator(artifacts, backend):
    return Generator(backend, artifacts.tokenizer, capacity_buckets=(64, 128), max_positions=128, cuda_graph=False,
                     eos_check_interval=1000)


def _calls_of(calls, ctx):
    return [c[1:] for c in calls if c[0] == id(ctx)]


@pytest.mark.parametrize("strategy", ["two_engines", "shared"])
def test_one_context_per_bucket_and_interleaved_buckets_keep_their_shapes(stand_in, strategy):
    artifacts, trt, calls, engines = stand_in
    backend = TensorRTBackend(artifacts, strategy, device="cpu", trt=trt)
    gen = _generator(artifacts, backend)
    prefix = torch.rand(2, image_len(artifacts), 16)
    small, large = 20, 100  # capacity 64, then 128, then 64 again
    for n in (small, large, small):
        gen.generate(prefix, max_new_tokens=n)
    contexts = [c for e in engines for c in e.contexts]
    assert len(contexts) == 3  # prefill + one per decode bucket; bucket A's context was reused, not re-shaped
    decode_contexts = contexts[1:] if strategy == "shared" else engines[1].contexts
    capacities = []
    for ctx in decode_contexts:
        shape_calls = [c for c in _calls_of(calls, ctx) if c[0] == "set_input_shape"]
        names = [c[1] for c in shape_calls]
        assert len(names) == len(set(names))  # every input shaped exactly once, before its first execution
        executes = [c for c in _calls_of(calls, ctx) if c[0] == "execute_async_v3"]
        assert executes and all(c[2] == executes[0][2] for c in executes)  # every run with the same shapes
        capacities.append(executes[0][2]["past_key_values.0.key"][2])
    assert sorted(capacities) == [64, 128]
    a = next(ctx for ctx in decode_contexts if ctx.shapes["past_key_values.0.key"][2] == 64)
    runs_a = [c for c in _calls_of(calls, a) if c[0] == "execute_async_v3"]
    assert len(runs_a) == 2 * (small - 1)  # both small generations ran on bucket A's context


@pytest.mark.parametrize("strategy", ["two_engines", "shared"])
def test_memory_and_profile_before_shapes_on_a_non_default_stream(stand_in, strategy):
    artifacts, trt, calls, engines = stand_in
    backend = TensorRTBackend(artifacts, strategy, device="cpu", trt=trt)
    _generator(artifacts, backend).generate(torch.rand(1, image_len(artifacts), 16), max_new_tokens=4)
    memory = {c[2] for c in calls if c[1] == "set_device_memory"}
    assert len(memory) == 1  # one block shared by every context
    for ctx in (c for e in engines for c in e.contexts):
        ops = [c[0] for c in _calls_of(calls, ctx)]
        assert ops[:2] == ["set_device_memory", "set_optimization_profile_async"]
        assert ops.index("set_optimization_profile_async") < ops.index("set_input_shape")
        streams = [c[1] for c in _calls_of(calls, ctx) if c[0] == "execute_async_v3"]
        streams += [c[2] for c in _calls_of(calls, ctx) if c[0] == "set_optimization_profile_async"]
        assert streams and set(streams) == {STREAM}
    sizes = {c[3] for c in calls if c[1] == "set_device_memory"}
    assert sizes == {max(e.get_device_memory_size_for_profile_v2(p) for e in engines
                         for p in range(e.num_optimization_profiles))}


def test_empty_tensors_get_distinct_non_null_addresses(stand_in):
    artifacts, trt, calls, engines = stand_in
    backend = TensorRTBackend(artifacts, "shared", device="cpu", trt=trt)
    _generator(artifacts, backend).generate(torch.rand(2, image_len(artifacts), 16), max_new_tokens=3)
    prefill, decode = engines[0].contexts
    L = artifacts.manifest.config.n_layer
    empty_prefill = [n for n, s in prefill.shapes.items() if 0 in s]
    assert len(empty_prefill) == 2 * L  # the context profile's empty past
    empty_decode = [n for n, s in decode.shapes.items() if 0 in s]
    assert empty_decode == ["image_features"]  # the generation profile's empty context
    addresses = [prefill.addresses[n] for n in empty_prefill] + [decode.addresses["image_features"]]
    assert all(addresses) and len(set(addresses)) == len(addresses)
    assert all(a % 256 == 0 for a in addresses)


def test_errors_carry_tensorrt_lines_and_the_default_stream_is_refused(stand_in, monkeypatch):
    artifacts, trt, calls, engines = stand_in
    backend = TensorRTBackend(artifacts, "two_engines", device="cpu", trt=trt)
    gen = _generator(artifacts, backend)
    engines[1].fail_next = True
    with pytest.raises(EngineError, match="illegal memory access \\(fake\\)"):
        gen.generate(torch.rand(1, image_len(artifacts), 16), max_new_tokens=4)
    prefix = torch.rand(9, image_len(artifacts), 16)
    with pytest.raises(ValueError, match="batch 9 exceeds the tensorrt backend's max batch 8"):
        gen.generate(prefix, max_new_tokens=4)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=0))
    with pytest.raises(EngineError, match="non-default CUDA stream"):
        current_stream_handle(torch.device("cuda"))


def test_rtx_stream_capture_check(stand_in):
    """An RTX context that says it cannot be captured keeps its bucket un-captured, with TensorRT's reason."""
    artifacts, trt, calls, engines = stand_in
    backend = TensorRTBackend(artifacts, "two_engines", device="cpu", trt=trt)
    gen = _generator(artifacts, backend)
    gen.generate(torch.rand(1, image_len(artifacts), 16), max_new_tokens=3)
    st = next(iter(gen._engines.values()))
    assert backend.capture_blocker(st.token, st.position, st.k, st.v) is None  # full TensorRT: no such query
    ctx = engines[1].contexts[0]
    ctx.is_stream_capturable = lambda stream: (engines[1].logger.log(Severity.ERROR, "blocking allocation") or False)
    reason = backend.capture_blocker(st.token, st.position, st.k, st.v)
    assert "not stream capturable" in reason and "blocking allocation" in reason


@pytest.mark.parametrize("stand_in", ["tensorrt", "tensorrt_rtx"], indirect=True)
@pytest.mark.parametrize("strategy", ["two_engines", "shared"])
def test_engine_outputs_reach_their_cache_slots_and_the_generator(stand_in, strategy):
    """Each present.{layer}.{key|value} output lands in that layer's key or value cache at the slot it describes
    (prefill: every slot of the prompt; decode: the row's position), and each flow's logits choose the tokens the
    generator returns; on full TensorRT and on TensorRT-RTX's runtime-config path alike."""
    artifacts, trt, calls, engines = stand_in
    backend = TensorRTBackend(artifacts, strategy, device="cpu", trt=trt)
    gen = _generator(artifacts, backend)
    P, L = image_len(artifacts), artifacts.manifest.config.n_layer
    prompts = [[256], [256, 116, 104]]
    result = gen.generate(torch.rand(2, P, 16), prompts, max_new_tokens=6)
    for b, prompt in enumerate(prompts):
        start = P + len(prompt)  # the first decode step writes here
        want = [FIRST_TOKEN + b] + [next_token(start + k) for k in range(5)]
        assert result.tokens[b].tolist() == want, b
        (st,) = gen._engines.values()  # one bucket
        for layer in range(L):
            for kv, cache in (("key", st.k), ("value", st.v)):
                code = kv_code(f"present.{layer}.{kv}")
                slots = torch.arange(start + 5, dtype=torch.float32)  # every slot written by prefill or decode
                got = cache[layer, b, :, : start + 5, :]
                assert torch.equal(got, (code + slots.view(1, -1, 1) + b / 4).expand_as(got)), (layer, kv, b)
    if trt.__name__ == "tensorrt_rtx":
        assert all(e.rtx_allocation == trt.ExecutionContextAllocationStrategy.USER_MANAGED for e in engines)


@pytest.mark.parametrize("strategy", ["two_engines", "shared"])
def test_a_decode_shape_outside_the_profile_names_the_generation_flow(stand_in, strategy):
    """The error for a decode input outside its profile reads the decode engine's generation profile, for both
    strategies (with two engines both profiles are number 0: picking by number would consult the prefill engine)."""
    artifacts, trt, calls, engines = stand_in
    backend = TensorRTBackend(artifacts, strategy, device="cpu", trt=trt)
    d = artifacts.manifest.dims
    engine = "decode.engine" if strategy == "two_engines" else "shared.engine"
    token, position = torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long)
    ok = torch.zeros(d.n_layer, 2, d.n_kv_head, 64, d.head_dim)
    backend.decode(token, position, ok, ok.clone())  # negative control: capacity 64 lies inside [64, 128]
    small = torch.zeros(d.n_layer, 2, d.n_kv_head, 32, d.head_dim)
    H, D = d.n_kv_head, d.head_dim
    with pytest.raises(EngineError, match=rf"past_key_values.0.key of shape \(2, {H}, 32, {D}\) lies "
                       rf"outside the generation profile of {engine} \(max \(8, {H}, 128, {D}\)\)"):
        backend.decode(token, position, small, small.clone())
