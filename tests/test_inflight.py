"""The in-flight engine in process: joins between steps leave every request's tokens as they are alone, per-row
sampling, cancellation, the prefix cache and the queue bound."""
import pytest
import torch

from mmgpt.checkpoint import load_checkpoint
from mmgpt.errors import UserError
from mmgpt.runtime.backends.torch_model import TorchBackend
from mmgpt.runtime.generator import Generator
from mmgpt.runtime.inflight import InflightEngine, PrefixCache, QueueFull, Request
from mmgpt.runtime.sampling import RowSampling, SamplingConfig, row_noise, sample_rows

CAPACITY = 64


@pytest.fixture(scope="module")
def model(trained):
    loaded = load_checkpoint(trained["last_ckpt"])
    return loaded.model, loaded.tokenizer


@pytest.fixture(scope="module")
def requests(model):
    """Twelve requests: different prefixes, prompts, budgets and sampling settings."""
    _, tok = model
    g = torch.Generator().manual_seed(5)
    texts = ["", "th", "one ", "s", "two t", "n"]
    hot = [SamplingConfig(temperature=5.0, top_k=40, top_p=0.95, seed=s) for s in (1, 2)]
    out = []
    for i in range(12):
        sampling = hot[i % 2] if i % 3 == 2 else SamplingConfig()
        prompt = [tok.bos_id, *tok.encode(texts[i % len(texts)], bos=False)]
        out.append(Request(torch.rand(8, 16, generator=g), prompt, max_tokens=4 + 3 * (i % 5), sampling=sampling))
    return out


def engine(model, rows=4, **kw):
    m, tok = model
    return InflightEngine(TorchBackend(m), tok, rows=rows, capacity=CAPACITY, cuda_graph=False, **kw)


def solo(model, request):
    """The request alone in an engine of one row."""
    e = engine(model, rows=1)
    state = e.submit(request)
    e.run()
    return state.tokens


def test_joins_between_steps_give_each_request_its_solo_tokens(model, requests):
    m, tok = model
    e = engine(model, rows=4)
    states = [e.submit(r) for r in requests[:6]]
    e.step()
    e.step()  # the first four run, two wait
    assert e.active_rows == 4 and e.queue_depth == 2
    states += [e.submit(r) for r in requests[6:]]  # arrive while others decode
    joined_mid_run = 0
    while e.has_work():
        before = {s.id for s in states if s.row is not None}
        e.step()
        joined_mid_run += len({s.id for s in states if s.row is not None} - before)
    assert joined_mid_run >= 4  # requests did join rows that others had left, between steps
    gen = Generator(TorchBackend(m), tok, capacity_buckets=[CAPACITY], cuda_graph=False)
    for r, s in zip(requests, states):
        assert s.done and s.finish_reason in ("stop", "length")
        assert len(s.tokens) <= r.max_tokens
        assert s.tokens == solo(model, r), s.id  # sampled rows too: noise depends only on (seed, token index)
        if r.sampling.greedy:  # and greedy rows equal the static generator's batch of one
            alone = gen.generate(r.context[None], [r.prompt], max_new_tokens=r.max_tokens)
            assert s.tokens == alone.tokens[0, : alone.num_generated[0]].tolist()
    sampled = [s.tokens for r, s in zip(requests, states) if not r.sampling.greedy]
    greedy_of_same = [solo(model, Request(r.context, r.prompt, r.max_tokens)) for r in requests
                      if not r.sampling.greedy]
    assert sampled != greedy_of_same  # negative control: the hot rows did sample


def test_seeds_decide_the_draws(model, requests):
    r = requests[2]
    again = solo(model, r)
    others = [solo(model, Request(r.context, r.prompt, r.max_tokens,
                                  SamplingConfig(temperature=5.0, top_k=40, top_p=0.95, seed=s))) for s in (7, 8, 9)]
    assert again == solo(model, r)
    assert any(o != again for o in others)


def test_per_row_sampling_mixes_greedy_and_sampled_rows():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g)
    rows = RowSampling.of([SamplingConfig(), SamplingConfig(temperature=1.0, top_k=1, seed=3),
                           SamplingConfig(temperature=1.0, top_p=1e-6, seed=4), SamplingConfig(),
                           SamplingConfig(temperature=2.0, seed=5), SamplingConfig(temperature=2.0, top_k=3, seed=6)],
                          "cpu")
    noise = row_noise(rows.seed, torch.zeros(6, dtype=torch.long), 50)
    got = sample_rows(logits, rows, noise)
    argmax = logits.argmax(-1)
    assert torch.equal(got[:4], argmax[:4])  # greedy, top_k=1 and a tiny top_p all take the argmax
    assert got[5] in logits[5].topk(3).indices
    draws = [int(sample_rows(logits, rows, row_noise(rows.seed, torch.full((6,), c), 50))[4]) for c in range(40)]
    assert len(set(draws)) > 5  # the hot row varies with the token index (a constant would pass the lines above)


def test_cancel_frees_the_row_for_a_waiting_request(model, requests):
    e = engine(model, rows=2)
    long = Request(requests[0].context, requests[0].prompt, max_tokens=40)
    a, b = e.submit(long), e.submit(long)
    c = e.submit(requests[1])
    e.step()
    assert e.active_rows == 2 and e.queue_depth == 1 and c.row is None
    a.cancel()
    e.step()
    assert a.finish_reason == "cancelled" and c.row == a.row and e.queue_depth == 0
    e.run()
    assert c.tokens == solo(model, requests[1]) and b.finish_reason in ("stop", "length")
    assert len(a.tokens) < 5  # it stopped where it was cancelled


def test_prefix_cache_hit_gives_the_tokens_of_a_miss(model, requests):
    cache = PrefixCache(budget_bytes=1 << 30, namespace="weights-a")
    e = engine(model, rows=3, prefix_cache=cache)
    first = [e.submit(r) for r in requests[:6]]
    e.run()
    assert (cache.hits, cache.misses) == (0, 6) and not any(s.cache_hit for s in first)
    # the same images again, some with other prompts of other lengths: those are fed after the cached prefix
    other_prompts = [Request(r.context, requests[4 - i].prompt, r.max_tokens, r.sampling)
                     for i, r in enumerate(requests[3:6])]
    again = [e.submit(r) for r in requests[:3]] + [e.submit(r) for r in other_prompts]
    e.run()
    assert cache.hits == 6 and all(s.cache_hit for s in again)
    assert [s.tokens for s in again[:3]] == [s.tokens for s in first[:3]]
    for r, s in zip(other_prompts, again[3:]):
        assert s.tokens == solo(model, r)
    assert [len(r.prompt) for r in other_prompts] != [len(r.prompt) for r in requests[3:6]]  # ragged, not replayed


def test_a_request_runs_on_its_features_as_submitted(model, requests):
    """The features stay on the host until the loop admits the request; a caller that reuses its tensor after
    submit (here: overwrites it while the request waits for a row) does not change what the request computes."""
    r = requests[0]
    features = r.context.clone()
    e = engine(model, rows=1)
    blocker = e.submit(requests[1])
    e.step()  # requests[1] holds the one row: the next request waits in the queue
    state = e.submit(Request(features, r.prompt, r.max_tokens, r.sampling))
    features.fill_(0.5)
    e.run()
    assert blocker.tokens == solo(model, requests[1]) and state.tokens == solo(model, r)
    assert state.tokens != solo(model, Request(features, r.prompt, r.max_tokens, r.sampling))  # the edit matters


def test_serving_benchmark_raises_a_failed_submit(model, requests):
    """The benchmark submits from a client thread; a request that fails there fails the run, never a report that
    silently leaves it out."""
    from mmgpt.bench.serving import run_inflight
    r = requests[0]
    jobs = [(0.0, requests[1]), (0.001, Request(r.context, [], r.max_tokens))]  # the second has no prompt
    with pytest.raises(UserError, match="empty prompt"):
        run_inflight(engine(model, rows=2), jobs)


def test_prefix_cache_is_lru_under_its_budget_and_keyed_by_weights():
    k = torch.zeros(2, 2, 8, 4)  # 512 bytes each of k and v: 1 KiB an entry
    cache = PrefixCache(budget_bytes=2 * 1024, namespace="w1")
    keys = [cache.key({"image": torch.full((8, 16), float(i))}) for i in range(3)]
    cache.put(keys[0], k, k)
    cache.put(keys[1], k, k)
    assert cache.get(keys[0]) is not None  # 0 is now the most recent
    cache.put(keys[2], k, k)
    assert cache.get(keys[1]) is None and cache.get(keys[0]) is not None and cache.get(keys[2]) is not None
    assert cache.nbytes == 2048
    assert PrefixCache(2048, "w2").key({"image": torch.full((8, 16), 0.0)}) != keys[0]
    with pytest.raises(UserError, match="must be >= 0"):
        PrefixCache(-1, "w")


def test_bad_requests_and_a_full_queue(model, requests):
    e = engine(model, rows=1, max_queue=2)
    r = requests[0]
    with pytest.raises(UserError, match=r"= 73 exceeds the largest cache capacity 64; lower max_new_tokens to 55"):
        e.submit(Request(r.context, r.prompt, 64))
    with pytest.raises(UserError, match="image features have F=15, but the model expects F=16"):
        e.submit(Request(r.context[:, :15], r.prompt, 4))
    with pytest.raises(UserError, match="not integers in its modality.s vocabulary"):
        e.submit(Request(r.context, [10**6], 4))
    with pytest.raises(UserError, match="empty prompt"):
        e.submit(Request(r.context, [], 4))
    with pytest.raises(UserError, match="max_new_tokens=0 must be an integer >= 1"):
        e.submit(Request(r.context, r.prompt, 0))
    e.submit(r)
    e.submit(r)
    with pytest.raises(QueueFull):
        e.submit(r)
    e.run()
    assert e.active_rows == 0 and e.queue_depth == 0
