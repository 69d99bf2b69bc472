"""The TensorRT backend's call protocol, pinned without a GPU: a recording stand-in for TensorRT's runtime API (the
real method names, recording the order of calls) drives the generator the way a real engine would.

What the protocol must hold (TensorRT developer guide; TensorRT-RTX "Working with CUDA Graphs"; trtexec):
one execution context per decode bucket, never re-shaped (a captured graph replays its context's shapes); device
memory and the profile set before any input shape; a distinct non-null address for every empty tensor; a
non-default stream; TensorRT's own error lines in every error.
"""
import enum
import json
import shutil
import types

import pytest
import torch

import mmgpt.runtime.backends.tensorrt_engines as engines_backend
from mmgpt.contract.artifacts import Artifacts
from mmgpt.contract.graphs import declare_graphs
from mmgpt.engines.build import ENGINES, profile_shapes, profile_sizes
from mmgpt.engines.trt import EngineError, record_path
from mmgpt.runtime.backends.tensorrt_engines import TensorRTBackend, current_stream_handle
from mmgpt.runtime.generator import Generator

STREAM = 7  # what the stand-in's "current stream" is


class Severity(enum.IntEnum):
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)


class FakeContext:
    def __init__(self, engine, strategy, calls):
        self.engine, self.calls, self.strategy = engine, calls, strategy
        self.shapes, self.addresses, self.profile = {}, {}, None

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
        return True


class FakeEngine:
    def __init__(self, profiles, logger, calls):
        self.profiles, self.logger, self.calls = profiles, logger, calls
        self.num_optimization_profiles = len(profiles)
        self.fail_next = False
        self.contexts = []

    def get_device_memory_size_for_profile_v2(self, p):
        return 4096 * (p + 1)

    def get_tensor_profile_shape(self, name, p):
        return self.profiles[p][name]

    def create_execution_context(self, strategy):
        assert strategy == fake_trt().ExecutionContextAllocationStrategy.USER_MANAGED
        ctx = FakeContext(self, strategy, self.calls)
        self.contexts.append(ctx)
        return ctx


def fake_trt(calls=None, engines=None):
    """A stand-in for the `tensorrt` module: what the backend touches, nothing else."""
    class ILogger:
        Severity = Severity

        def __init__(self):
            pass

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, blob):
            spec = json.loads(blob)
            engine = FakeEngine([{n: [tuple(s) for s in mom] for n, mom in p.items()} for p in spec], self.logger,
                                calls)
            engines.append(engine)
            return engine

    return types.SimpleNamespace(
        __name__="tensorrt", __version__="10.99.fake", ILogger=ILogger, Runtime=Runtime,
        ExecutionContextAllocationStrategy=types.SimpleNamespace(STATIC=0, ON_PROFILE_CHANGE=1, USER_MANAGED=2))


@pytest.fixture
def stand_in(exported, tmp_path, monkeypatch):
    """Artifacts with 'engines' the stand-in loads (their profiles, as the real build computes them)."""
    path = tmp_path / "digits"
    shutil.copytree(exported, path)
    artifacts = Artifacts.open(path)
    cfg = {"profiles": {"batch": [1, 2, 8], "prompt": [1, 4, 32], "capacity": [64, 128, 128]}}
    sizes = profile_sizes(artifacts, cfg)
    graphs = declare_graphs(artifacts.manifest.dims)
    for strategy, engines in ENGINES.items():
        built = {}
        for name, (graph, profile_names) in engines.items():
            profiles = [profile_shapes(graphs[graph], sizes[p]) for p in profile_names]
            (path / f"{name}.engine").write_text(json.dumps(profiles))
            record = {"weights_sha256_tree": artifacts.manifest.weights.sha256_tree, "source": graph}
            record_path(path / f"{name}.engine").write_text(json.dumps(record))
            built[name] = {"file": f"{name}.engine"}
        artifacts.record_engines(strategy, {"runtime": "tensorrt", "engines": built, "context_past_slots": 0})
    calls, engines = [], []
    monkeypatch.setattr(engines_backend, "current_stream_handle", lambda device: STREAM)
    return artifacts, fake_trt(calls, engines), calls, engines


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
    prefix = torch.rand(2, artifacts.manifest.prefix_len, 16)
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
    _generator(artifacts, backend).generate(torch.rand(1, artifacts.manifest.prefix_len, 16), max_new_tokens=4)
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
    _generator(artifacts, backend).generate(torch.rand(2, artifacts.manifest.prefix_len, 16), max_new_tokens=3)
    prefill, decode = engines[0].contexts
    L = artifacts.manifest.config.n_layer
    empty_prefill = [n for n, s in prefill.shapes.items() if 0 in s]
    assert len(empty_prefill) == 2 * L  # the context profile's empty past
    empty_decode = [n for n, s in decode.shapes.items() if 0 in s]
    assert empty_decode == ["prefix"]  # the generation profile's empty prefix
    addresses = [prefill.addresses[n] for n in empty_prefill] + [decode.addresses["prefix"]]
    assert all(addresses) and len(set(addresses)) == len(addresses)
    assert all(a % 256 == 0 for a in addresses)


def test_errors_carry_tensorrt_lines_and_the_default_stream_is_refused(stand_in, monkeypatch):
    artifacts, trt, calls, engines = stand_in
    backend = TensorRTBackend(artifacts, "two_engines", device="cpu", trt=trt)
    gen = _generator(artifacts, backend)
    engines[1].fail_next = True
    with pytest.raises(EngineError, match="illegal memory access \\(fake\\)"):
        gen.generate(torch.rand(1, artifacts.manifest.prefix_len, 16), max_new_tokens=4)
    prefix = torch.rand(9, artifacts.manifest.prefix_len, 16)
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
    gen.generate(torch.rand(1, artifacts.manifest.prefix_len, 16), max_new_tokens=3)
    st = next(iter(gen._state.values()))
    assert backend.capture_blocker(st.token, st.position, st.k, st.v) is None  # full TensorRT: no such query
    ctx = engines[1].contexts[0]
    ctx.is_stream_capturable = lambda stream: (engines[1].logger.log(Severity.ERROR, "blocking allocation") or False)
    reason = backend.capture_blocker(st.token, st.position, st.k, st.v)
    assert "not stream capturable" in reason and "blocking allocation" in reason
