"""The HTTP API on a real localhost server (uvicorn, the app Ray Serve runs in each replica), queried with the
official `openai` client: concurrent streams equal solo generation, seeded sampling repeats, images as data URLs,
every bad request's 4xx, cancellation through metrics. serve.py on Ray itself: tests/test_serve_ray.py (slow)."""
import asyncio
import base64
import io
import json
import time

import numpy as np
import pytest
import torch

from helpers import require
from mmgpt.contract.artifacts import Artifacts
from mmgpt.data.digits import DigitsTask, read_images
from mmgpt.runtime.backends.onnx_runtime import OnnxRuntimeBackend
from mmgpt.runtime.generator import Generator
from mmgpt.serving.protocol import Limits
from mmgpt.serving.service import ModelService, ServeSettings

openai = require("openai", "the official OpenAI client (the dev extra)")
uvicorn = require("uvicorn", "Ray Serve's HTTP server (the serve extra)")
httpx = require("httpx", "comes with the openai client")

KEY = "sk-test-key"


class LocalServer:
    """mmgpt.serving.local.LocalServer over a new ModelService, with its metrics parsed."""

    def __init__(self, settings: ServeSettings):
        from mmgpt.serving.local import LocalServer as Served
        self.served = Served(ModelService(settings))
        self.service, self.url = self.served.service, self.served.url

    def stop(self):
        self.served.stop()

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        return {k.removeprefix("mmgpt_"): float(v) for k, v in (line.split() for line in text.splitlines())}


@pytest.fixture(scope="module")
def server(exported):
    s = LocalServer(ServeSettings(artifacts=str(exported), backend="onnxruntime", device="cpu", rows=8,
                                  api_key=KEY, limits=Limits(max_body_bytes=64 << 10, max_image_bytes=8 << 10)))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def validation(exported):
    """Digits validation prefixes and the solo (batch of one) greedy tokens of each, through the same backend."""
    artifacts = Artifacts.open(exported)
    task = DigitsTask.from_data_config(artifacts.manifest.data)
    _, val, _, _ = task.build()
    gen = Generator(OnnxRuntimeBackend(artifacts), artifacts.tokenizer, capacity_buckets=[128], cuda_graph=False)
    return artifacts, val.values["image"][:16], gen


def solo_ids(gen, prefix, max_tokens, eos):
    result = gen.generate(prefix[None], max_new_tokens=max_tokens)
    return [t for t in result.tokens[0, : result.num_generated[0]].tolist() if t != eos]


def png_data_url(image: np.ndarray) -> str:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray((255 - image * 255 / 16).astype(np.uint8)).resize((32, 32)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def client(server, key=KEY, **kw):
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, **kw)


async def stream_completion(c, model, **kw):
    text, ids, reasons = "", [], []
    async for event in await c.completions.create(model=model, stream=True, **kw):
        choice = event.choices[0]
        text += choice.text
        ids += choice.model_extra["token_ids"]
        reasons.append(choice.finish_reason)
    return text, ids, reasons[-1]


def test_models_and_health(server):
    async def listed():
        return await client(server).models.list()
    models = asyncio.run(listed())
    assert [m.id for m in models.data] == [server.service.model_name] == ["digits"]
    assert httpx.get(f"{server.url}/health", headers={"Authorization": f"Bearer {KEY}"}).json() == {"status": "ok"}


def test_32_concurrent_streams_equal_solo_generation_and_seeds_repeat(server, validation):
    artifacts, prefixes, gen = validation
    eos = artifacts.tokenizer.eos_id
    c = client(server)
    jobs = []  # (kind, prefix index, max_tokens, sampling)
    for i in range(32):
        max_tokens = 4 + (i * 7) % 20
        if i % 4 == 3:  # 8 sampled: 4 settings, each sent twice
            seed = i % 8
            jobs.append(("sampled", i % 16, 30, dict(temperature=2.0, top_p=0.95, seed=seed, extra_body={"top_k": 50})))
        else:
            jobs.append(("greedy", i % 16, max_tokens, dict(temperature=0)))
    before = server.metrics()

    async def run_all():
        return await asyncio.gather(*[
            stream_completion(c, "digits", prompt="", max_tokens=m,
                              extra_body={"features": prefixes[p].tolist(), **kw.pop("extra_body", {})}, **kw)
            for _, p, m, kw in jobs])
    results = asyncio.run(run_all())
    sampled = {}
    for (kind, p, m, kw), (text, ids, reason) in zip(jobs, results):
        if kind == "greedy":
            want = solo_ids(gen, prefixes[p], m, eos)
            assert ids == want, (p, m)
            assert text == artifacts.tokenizer.decode(want)
            assert reason == ("length" if len(want) == m else "stop")
        else:
            sampled.setdefault((p, kw["seed"]), []).append(ids)
    assert len(sampled) == 4 and all(a == b for a, b in sampled.values())  # seeded: reproducible
    greedy_of = {(p, s): solo_ids(gen, prefixes[p], 30, eos) for p, s in sampled}
    assert any(v[0] != greedy_of[k] for k, v in sampled.items())  # negative control: sampling did sample
    after = server.metrics()
    assert after["requests_total"] - before["requests_total"] == 32
    assert after["active_rows"] == 0 and after["queue_depth"] == 0
    assert after["generated_tokens_total"] > before["generated_tokens_total"]


def test_chat_with_data_url_images_and_the_prefix_cache(server, validation):
    artifacts, _, gen = validation
    from sklearn.datasets import load_digits
    digits = load_digits()
    urls = [png_data_url(digits.images[i]) for i in (0, 7)]
    task = DigitsTask.from_data_config(artifacts.manifest.data)
    files = [io.BytesIO(base64.b64decode(u.split(",", 1)[1])) for u in urls]
    prefix = torch.from_numpy(read_images(files, task)[0])  # preprocessed as in training
    want = artifacts.tokenizer.decode(solo_ids(gen, prefix, 20, artifacts.tokenizer.eos_id))
    content = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    messages = [{"role": "user", "content": content}]
    hits = server.metrics()["prefix_cache_hits_total"]

    async def ask():
        c = client(server)
        answers = [await c.chat.completions.create(model="digits", max_tokens=20, temperature=0, messages=messages)
                   for _ in range(2)]
        text = ""
        async for event in await c.chat.completions.create(model="digits", max_tokens=20, temperature=0, stream=True,
                                                            messages=messages):
            text += event.choices[0].delta.content or ""
        return [a.choices[0].message.content for a in answers] + [text]
    assert asyncio.run(ask()) == [want] * 3  # the second and third hit the prefix cache
    assert server.metrics()["prefix_cache_hits_total"] == hits + 2
    assert want.startswith(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"))


def test_every_bad_request_gets_its_4xx_and_the_server_still_answers(server, validation):
    _, prefixes, _ = validation
    good = prefixes[0].tolist()
    url = f"{server.url}/v1/completions"
    auth = {"Authorization": f"Bearer {KEY}"}

    def post(body, path="/v1/completions", headers=auth, raw=None):
        return httpx.post(f"{server.url}{path}", headers=headers, timeout=30,
                          content=raw if raw is not None else json.dumps(body).encode())
    base = {"model": "digits", "prompt": "", "max_tokens": 4, "features": good}
    chat = {"model": "digits", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "URL"}}, {"type": "image_url", "image_url": {"url": "URL"}}]}]}

    def chat_with(u):
        return json.loads(json.dumps(chat).replace("URL", u))
    cases = [
        (post(None, raw=b'{"model": "digits", "prompt": '), 400, "not valid JSON"),
        (post(chat_with("file:///etc/passwd"), "/v1/chat/completions"), 400, "is not a base64 image data URL"),
        (post(chat_with("http://127.0.0.1:9/x.png"), "/v1/chat/completions"), 400, "never fetched"),
        (post(chat_with("data:image/png;base64,@@@@"), "/v1/chat/completions"), 400, "not valid base64"),
        (post(chat_with("data:image/png;base64," + "A" * 20000), "/v1/chat/completions"), 413, "more than the 8192"),
        (post(chat_with("data:image/png;base64," + base64.b64encode(b"not a png").decode()), "/v1/chat/completions"),
         400, "not a readable image"),
        (post(None, raw=b" " * (70 << 10)), 413, "more than the 65536 allowed"),
        (post({**base, "features": [row[:15] for row in good]}), 400, "image features have F=15"),
        (post({**base, "features": [[str(x) for x in row] for row in good]}), 400, "must be a finite number"),
        (post({**base, "features": good[0]}), 400, "'features' must be a (P, F) list"),
        (post({**base, "max_tokens": 500}), 400, "exceeds the largest cache capacity 128; lower max_new_tokens to 119"),
        (post({**base, "model": "gpt-4"}), 404, "model 'gpt-4' does not exist"),
        (post({**base, "temperature": -0.5}), 400, "temperature must lie in [0, 2]"),
        (post({**base, "n": 99}), 400, "n must lie in [1, 8]"),
        (post({**base, "features": None}), 400, "image length P=0, but the exported graphs expect P=8"),
        (post(base, headers={}), 401, "missing or wrong API key"),
        (post(base, headers={"Authorization": "Bearer sk-wrong"}), 401, "missing or wrong API key"),
        (httpx.get(f"{server.url}/v1/models"), 401, "missing or wrong API key"),
        (httpx.get(f"{server.url}/metrics"), 401, "missing or wrong API key"),
    ]
    for response, status, message in cases:
        assert response.status_code == status, (message, response.text)
        assert message in response.json()["error"]["message"], (message, response.text)
    ok = httpx.post(url, headers=auth, json=base, timeout=30)  # negative control: the same request, well-formed
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")
    async def listed():
        return await client(server, key="sk-wrong").models.list()
    with pytest.raises(openai.AuthenticationError):
        asyncio.run(listed())


def test_a_full_queue_answers_429(exported, validation):
    _, prefixes, _ = validation
    s = LocalServer(ServeSettings(artifacts=str(exported), backend="onnxruntime", device="cpu", rows=1, max_queue=1))
    try:
        body = {"model": "digits", "prompt": "", "max_tokens": 100, "temperature": 2.0, "seed": 1,
                "features": prefixes[0].tolist()}

        async def burst():
            async with httpx.AsyncClient(timeout=120) as h:
                return await asyncio.gather(*[h.post(f"{s.url}/v1/completions", json=body) for _ in range(6)])
        responses = asyncio.run(burst())
        codes = sorted(r.status_code for r in responses)
        assert 200 in codes and 429 in codes, codes  # one runs (and one may wait), the rest are turned away
        busy = next(r for r in responses if r.status_code == 429)
        assert "the server is busy" in busy.json()["error"]["message"] and busy.headers["retry-after"] == "1"
        assert s.metrics()["requests_rejected_total"] == codes.count(429)
    finally:
        s.stop()


def test_clients_that_disconnect_free_their_rows(exported, validation):
    """Six streams on one row: one runs, five wait; every client hangs up once its response has begun. The waiting
    ones cannot have finished (each needs the row for several steps), so their requests end as cancelled."""
    _, prefixes, _ = validation
    s = LocalServer(ServeSettings(artifacts=str(exported), backend="onnxruntime", device="cpu", rows=1))
    try:
        body = {"model": "digits", "prompt": "", "max_tokens": 100, "temperature": 2.0, "seed": 4, "stream": True,
                "features": prefixes[1].tolist()}

        async def hang_up(h):
            async with h.stream("POST", f"{s.url}/v1/completions", json=body) as response:
                assert response.status_code == 200

        async def six():
            async with httpx.AsyncClient(timeout=60) as h:
                await asyncio.gather(*[hang_up(h) for _ in range(6)])
        asyncio.run(six())
        deadline = time.monotonic() + 30
        while (m := s.metrics())["requests_finished_total"] < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert m["requests_finished_total"] == 6 and m["active_rows"] == 0 and m["queue_depth"] == 0
        assert m["requests_cancelled_total"] >= 4
        ok = httpx.post(f"{s.url}/v1/completions", json={**body, "stream": False, "max_tokens": 3}, timeout=60)
        assert ok.status_code == 200  # the rows are free again
    finally:
        s.stop()
