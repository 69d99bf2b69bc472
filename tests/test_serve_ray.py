"""`python serve.py` itself: a local Ray instance, Ray Serve's proxy on localhost, the official `openai` client.
Slow (Ray starts in ~30 s on 2 cores): 32 concurrent streams equal solo generation, a bad request's 4xx, the API key,
and SIGTERM draining a stream that is still running before the command exits."""
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from helpers import ROOT, require
from mmgpt.contract.artifacts import Artifacts
from mmgpt.runtime.backends.onnx_runtime import OnnxRuntimeBackend
from mmgpt.runtime.generator import Generator

pytestmark = pytest.mark.slow
KEY = "sk-ray-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(exported, tmp_path_factory):
    require("ray.serve", "Ray Serve (the serve extra)")
    httpx = require("httpx", "comes with the openai client")
    port = free_port()
    log = open(tmp_path_factory.mktemp("serve") / "serve.log", "w+")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([sys.executable, "serve.py", f"artifacts={exported}", f"port={port}", f"api_key={KEY}",
                             "backend=onnxruntime", "device=cpu", "rows=8", "local_num_cpus=2", "drain_s=60"],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        assert proc.poll() is None, log.seek(0) or log.read()[-4000:]
        try:
            if httpx.get(f"{url}/health", headers={"Authorization": f"Bearer {KEY}"}, timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "serve.py did not answer /health in 300 s"
        time.sleep(1)
    yield proc, url, log
    if proc.poll() is None:
        proc.kill()
        proc.wait(60)


def test_serve_py_on_ray(served, exported):
    openai = require("openai", "the official OpenAI client (the dev extra)")
    httpx = require("httpx", "comes with the openai client")
    proc, url, log = served
    artifacts = Artifacts.open(exported)
    from mmgpt.data.digits import DigitsTask
    _, val, _, _ = DigitsTask.from_data_config(artifacts.manifest.data).build()
    images = val.values["image"]
    gen = Generator(OnnxRuntimeBackend(artifacts), artifacts.tokenizer, capacity_buckets=[128], cuda_graph=False)
    eos = artifacts.tokenizer.eos_id
    c = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)

    async def one(i):
        ids = []
        stream = await c.completions.create(model="digits", prompt="", max_tokens=4 + i % 13, temperature=0,
                                            stream=True, extra_body={"features": images[i % 16].tolist()})
        async for event in stream:
            ids += event.choices[0].model_extra["token_ids"]
        return ids

    async def all32():
        return await asyncio.gather(*[one(i) for i in range(32)])
    for i, ids in enumerate(asyncio.run(all32())):
        solo = gen.generate(images[i % 16][None], max_new_tokens=4 + i % 13)
        assert ids == [t for t in solo.tokens[0, : solo.num_generated[0]].tolist() if t != eos], i

    bad = httpx.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
                     json={"model": "digits", "prompt": "", "temperature": -1, "features": images[0].tolist()})
    assert bad.status_code == 400 and "temperature must lie in [0, 2]" in bad.json()["error"]["message"]
    assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 401

    # SIGTERM while a stream runs: the stream still ends normally, then the command exits
    body = {"model": "digits", "prompt": "", "max_tokens": 100, "temperature": 2.0, "seed": 2, "stream": True,
            "features": images[3].tolist()}
    reasons = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        lines = response.iter_lines()
        next(lines)
        proc.send_signal(signal.SIGTERM)
        for line in lines:
            if line.startswith("data: {"):
                reasons.append(line)
    assert reasons and ('"finish_reason": "length"' in reasons[-1] or '"finish_reason": "stop"' in reasons[-1])
    assert proc.wait(120) == 0, log.seek(0) or log.read()[-4000:]
    log.seek(0)
    assert "draining in-flight requests, then stopping" in log.read()
