"""The GPU suite, `pytest -m gpu` on a CUDA machine: what only a GPU can show, with the kernels compiled (the default
suite runs them in Triton's interpreter). Skipped only where there is no CUDA device.

- CUDA-graph replay gives the tokens of un-captured execution on every backend that captures: the torch backend
  eager and compiled, and the fused Triton kernels; a second call captures nothing.
- Interleaved buckets: one generator serving 24, then 100, then 24 new tokens replays the first bucket's graph
  with the first bucket's tokens.
- The fused Triton kernels give the torch backend's greedy tokens on a small trained model's validation inputs.
- The persistent decode kernel (Hopper): one step's logits at GPT-2 124M / 355M / 1.5B shapes, batch 1 and 8,
  prefix 0 and 576,
  as close to the torch backend's as torch-triton's, reproducible bit for bit, every logit written; its greedy
  tokens under the CUDA graph are torch-triton's at batch 1 and 8.
- In-flight batching on captured graphs (decode step and prefill): requests that join between replayed steps get the
  tokens they get alone, un-captured.
"""
import copy

import pytest
import torch

from mmgpt.model import GPTConfig, MultimodalGPT, image_to_text
from mmgpt.runtime.backends.torch_model import TorchBackend
from mmgpt.runtime.generator import Generator
from mmgpt.runtime.inflight import InflightEngine, PrefixCache, Request
from mmgpt.runtime.sampling import SamplingConfig
from mmgpt.tokenizer import ByteTokenizer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
BACKENDS = ["torch", "torch-compile", "torch-triton", "torch-persistent"]
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


def backend_of(name: str, model):
    if name == "torch-triton":
        from mmgpt.runtime.backends.fused_triton import TritonBackend
        return TritonBackend(model)
    if name == "torch-persistent":
        if not HOPPER:
            pytest.skip("the persistent decode kernel needs compute capability 9.0 (bulk copies)")
        from mmgpt.runtime.backends.persistent import PersistentBackend
        return PersistentBackend(model)
    return TorchBackend(model, compile=name == "torch-compile")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=4, n_embd=128, block_size=256, vocab_size=300, **image_to_text(8))
    model = MultimodalGPT(config).cuda().half().eval()
    with torch.no_grad():  # wider than the init, so logits are far apart and greedy choices are not near-ties
        for p in model.parameters():
            p.mul_(4.0)
    return model


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(temperature=0.8, top_k=50, seed=7)],
                         ids=["greedy", "seeded"])
def test_graph_replay_gives_the_uncaptured_tokens(model, name, sampling):
    tok = ByteTokenizer()
    backend = backend_of(name, model)
    eager = Generator(backend, tok, max_positions=256, cuda_graph=False, eos_check_interval=1000)
    graphed = Generator(backend, tok, max_positions=256, cuda_graph=True, eos_check_interval=1000)
    g = torch.Generator().manual_seed(1)
    prefix = torch.randn(3, 8, 8, generator=g)
    prompts = [[256], [256, 116, 104], [256, 102, 111, 117, 114]]  # ragged
    want = eager.generate(prefix, prompts, max_new_tokens=48, sampling=sampling)
    got = graphed.generate(prefix, prompts, max_new_tokens=48, sampling=sampling)
    captures = graphed.graph_captures
    again = graphed.generate(prefix, prompts, max_new_tokens=48, sampling=sampling)
    assert got.cuda_graph and captures >= 1
    assert torch.equal(got.tokens, want.tokens), (got.tokens, want.tokens)
    assert torch.equal(again.tokens, want.tokens) and graphed.graph_captures == captures  # replayed, not re-captured


@pytest.mark.parametrize("name", BACKENDS)
def test_interleaved_buckets_keep_their_own_graphs(model, name):
    tok = ByteTokenizer()
    backend = backend_of(name, model)
    graphed = Generator(backend, tok, capacity_buckets=(64, 128, 256), max_positions=256, cuda_graph=True,
                        eos_check_interval=1000)
    eager = Generator(backend, tok, capacity_buckets=(64, 128, 256), max_positions=256, cuda_graph=False,
                      eos_check_interval=1000)
    prefix = torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(3))
    runs = [graphed.generate(prefix, max_new_tokens=n) for n in (24, 100, 24)]
    assert runs[0].capacity == runs[2].capacity < runs[1].capacity
    assert torch.equal(runs[2].tokens, runs[0].tokens)
    assert torch.equal(runs[2].tokens, eager.generate(prefix, max_new_tokens=24).tokens)
    assert torch.equal(runs[1].tokens, eager.generate(prefix, max_new_tokens=100).tokens)


def test_triton_gives_the_torch_tokens_on_a_trained_model(exported):
    from mmgpt.contract.artifacts import Artifacts
    from mmgpt.data.inputs import load_inputs
    from mmgpt.runtime.backends.fused_triton import TritonBackend
    artifacts = Artifacts.open(exported)
    model = artifacts.load_model("cuda")
    inputs = load_inputs("digits", artifacts.manifest.data, artifacts.manifest.config, artifacts.tokenizer, limit=32)
    prefix, captions = inputs.context["image"], inputs.references
    runs = {}
    for name, backend in (("torch", TorchBackend(model)), ("triton", TritonBackend(model))):
        gen = Generator(backend, artifacts.tokenizer, max_positions=model.config.block_size)
        runs[name] = gen.generate(prefix, max_new_tokens=24)
    assert torch.equal(runs["triton"].tokens, runs["torch"].tokens)
    assert sum(t == c for t, c in zip(runs["torch"].texts, captions)) >= len(captions) // 2  # a trained model


@pytest.mark.parametrize("name", ["torch", "torch-triton"])
def test_inflight_joins_on_captured_graphs_give_solo_tokens(model, name):
    tok = ByteTokenizer()
    backend = backend_of(name, model)
    g = torch.Generator().manual_seed(5)
    requests = [Request(torch.randn(8, 8, generator=g), [256, *range(100, 100 + i % 5)], 8 + 5 * (i % 4),
                        SamplingConfig(temperature=0.8, seed=i) if i % 3 == 0 else SamplingConfig())
                for i in range(10)]
    engine = InflightEngine(backend, tok, rows=4, capacity=128, cuda_graph=True)
    assert engine.graphs and engine.capture_prefill
    states = [engine.submit(r) for r in requests[:5]]
    engine.step()
    engine.step()
    states += [engine.submit(r) for r in requests[5:]]  # join rows freed between replayed steps
    engine.run()
    step_graphs = dict(engine.graphs)
    assert {greedy for greedy, _ in step_graphs} == {True, False}  # greedy and sampled steps both captured
    for r, s in zip(requests, states):
        solo = InflightEngine(backend, tok, rows=1, capacity=128, cuda_graph=False)
        alone = solo.submit(r)
        solo.run()
        assert s.tokens == alone.tokens, r
    again = [engine.submit(r) for r in requests]
    engine.run()
    assert [s.tokens for s in again] == [s.tokens for s in states] and engine.graphs == step_graphs  # replayed
    three = [engine.submit(r) for r in requests[:3]]  # one join of three in a bucket of four: the padded row
    engine.run()  # repeats the first joiner's inputs and writes
    assert [s.tokens for s in three] == [s.tokens for s in states[:3]]


@pytest.mark.parametrize("name", ["torch", "torch-triton"])
def test_prefix_cache_hits_on_captured_graphs_give_the_tokens_of_a_miss(model, name):
    """In fp32: a hit attends over its cached context with the explicit-score kernel, a miss with SDPA's, and
    in fp16 the two round differently enough to part ways after a few tokens."""
    tok = ByteTokenizer()
    backend = backend_of(name, copy.deepcopy(model).float())
    g = torch.Generator().manual_seed(6)
    images = [torch.randn(8, 8, generator=g) for _ in range(2)]
    requests = [Request(images[i % 2], [256, *range(100, 100 + i % 3)], 10,
                        SamplingConfig(temperature=0.8, seed=i) if i % 2 else SamplingConfig()) for i in range(6)]
    cached = InflightEngine(backend, tok, rows=4, capacity=128, prefix_cache=PrefixCache(1 << 30, "test"))
    states = []
    for r in requests:  # one at a time: every request after the first of its image hits
        states.append(cached.submit(r))
        cached.run()
    assert cached.cache.hits == 4 and [s.cache_hit for s in states] == [False, False, True, True, True, True]
    plain = InflightEngine(backend, tok, rows=4, capacity=128)
    for r, s in zip(requests, states):
        alone = plain.submit(r)
        plain.run()
        assert s.tokens == alone.tokens, r
    again = [cached.submit(r) for r in requests]  # hits joining together: four in one replay, then two
    cached.run()
    assert [s.tokens for s in again] == [s.tokens for s in states] and cached.cache.hits == 10
    three = [cached.submit(r) for r in requests[:3]]  # three hits in a replay of four: the padded joiner repeats
    cached.run()  # the first one's cached context and writes
    assert [s.tokens for s in three] == [s.tokens for s in states[:3]] and cached.cache.hits == 13


GPT2_SHAPES = {"124m": (12, 12, 768), "355m": (24, 16, 1024), "1p5b": (48, 25, 1600)}  # layers, heads, width


@pytest.fixture(scope="module")
def gpt2_models():
    """GPT-2 shapes with random fp16 weights, made once per size on first use."""
    models = {}

    def of(size):
        if size not in models:
            models.clear()  # one at a time: 1.5B takes 3 GB
            torch.manual_seed(0)
            n_layer, n_head, n_embd = GPT2_SHAPES[size]
            config = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=1024, vocab_size=50257,
                               **image_to_text(8))
            models[size] = MultimodalGPT(config).cuda().half().eval()
        return models[size]
    return of


@pytest.mark.skipif(not HOPPER, reason="the persistent decode kernel needs compute capability 9.0 (bulk copies)")
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("prefix", [0, 576])
@pytest.mark.parametrize("size", list(GPT2_SHAPES))
def test_persistent_step_matches_the_fused_kernels(gpt2_models, size, batch, prefix):
    from mmgpt.runtime.backends.fused_triton import TritonBackend
    from mmgpt.runtime.backends.persistent import PersistentBackend
    gpt2 = gpt2_models(size)
    c, S = gpt2.config, 1024
    g = torch.Generator(device="cuda").manual_seed(batch + prefix)
    k = torch.randn(c.n_layer, batch, c.n_head, S, c.head_dim, device="cuda", generator=g).half()
    v = torch.randn(k.shape, device="cuda", generator=g).half()
    pos = prefix + 32 + torch.randint(0, 256, (batch, 1), device="cuda", generator=g)
    ids = torch.randint(0, c.vocab_size, (batch, 1), device="cuda", generator=g)
    persistent = PersistentBackend(gpt2)
    runs = {}
    for name, backend in (("torch", TorchBackend(gpt2)), ("triton", TritonBackend(gpt2)),
                          ("persistent", persistent)):
        kc, vc = k.clone(), v.clone()
        with torch.no_grad():
            runs[name] = (backend.decode(ids, pos, kc, vc).float().clone(), kc, vc)
    want = runs["torch"][0]

    def error(name):
        return ((runs[name][0] - want).abs().max() / want.abs().max()).item()
    print(f"logits error relative to scale: persistent {error('persistent'):.2e}, triton {error('triton'):.2e}")
    assert error("persistent") <= max(2 * error("triton"), 2e-3)
    for cache in (1, 2):  # the new key / value at each row's position, nothing else changed
        got, ref = runs["persistent"][cache].float(), runs["triton"][cache].float()
        assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()
        changed = (runs["persistent"][cache] != (k if cache == 1 else v)).any(-1)  # (L, B, H, S)
        assert changed.sum(-1).le(1).all() and changed.nonzero()[:, 3].eq(pos[changed.nonzero()[:, 1], 0]).all()
    logits = runs["persistent"][0]
    out = persistent.decode(ids, pos, k.clone(), v.clone())
    assert torch.equal(out, logits)  # reproducible: reductions in a fixed order
    out.fill_(float("nan"))  # poison the returned buffer: the next step must write every logit
    assert torch.equal(persistent.decode(ids, pos, k.clone(), v.clone()), logits)


@pytest.mark.skipif(not HOPPER, reason="the persistent decode kernel needs compute capability 9.0 (bulk copies)")
@pytest.mark.parametrize("batch", [1, 8])
def test_persistent_greedy_tokens_are_the_fused_kernels(model, batch):
    tok = ByteTokenizer()
    g = torch.Generator().manual_seed(9)
    prefix = torch.randn(batch, 8, 8, generator=g)
    prompts = [[256, *range(100, 100 + i % 5)] for i in range(batch)]
    runs = {name: Generator(backend_of(name, model), tok, max_positions=256, cuda_graph=True,
                            eos_check_interval=1000).generate(prefix, prompts, max_new_tokens=64)
            for name in ("torch-triton", "torch-persistent")}
    assert runs["torch-persistent"].cuda_graph
    assert torch.equal(runs["torch-persistent"].tokens, runs["torch-triton"].tokens)


def test_requests_submitted_from_a_client_thread_while_the_loop_captures(model):
    """The server submits from its handlers' threads while the engine's loop captures graphs as it first needs them
    (a join bucket, a row bucket, the sampled step). The caller's thread must issue no CUDA work: under a capture
    that fails the capture (the serving benchmark at 1.5B died of it)."""
    from mmgpt.bench.serving import run_inflight
    from mmgpt.runtime.backends.fused_triton import TritonBackend
    g = torch.Generator().manual_seed(8)
    images = [torch.randn(8, 8, generator=g) for _ in range(3)]
    jobs = [(0.002 * i, Request(images[i % 3], [256, *range(100, 100 + i % 7)], 4 + i % 5,
                                SamplingConfig(temperature=0.8, seed=i) if i % 4 == 3 else SamplingConfig()))
            for i in range(40)]
    engine = InflightEngine(TritonBackend(model), ByteTokenizer(), rows=8, capacity=128,
                            prefix_cache=PrefixCache(1 << 30, "client-thread"))
    result = run_inflight(engine, jobs)  # every graph is captured during this run, with submits arriving
    assert result["prefix_cache_hits"] > 0 and engine.graph_captures > 0
    assert result["tokens"] >= len(jobs) and not engine.has_work()  # run_inflight fails where one got none
