"""Where a streamed request's time to first token goes on the HTTP path: the app's submit, the engine's first step,
the token handed to the event loop, the response headers and the first SSE line, as seen from one kept-alive client.

python benchmarks/profile_http.py [--artifacts artifacts/http-bench] [--requests 20] [--out F.json]
"""
import argparse
import asyncio
import datetime
import platform
import statistics
import time

import torch

from mmgpt.bench.results import git_commit
from mmgpt.contract.artifacts import Artifacts
from mmgpt.files import write_json
from mmgpt.serving.local import LocalServer
from mmgpt.serving.service import ModelService, ServeSettings

MARKS = ("submit", "step", "token_handed_over", "headers", "first_sse_line")


def instrument(service: ModelService, marks: dict) -> None:
    """Time stamps at the service's submit, the engine's step and the first token put on the request's queue."""
    submit, step = service.loop.submit, service.engine.step

    def timed_submit(request, queue, tag):
        marks["submit"] = time.perf_counter()
        put = queue.put_nowait

        def timed_put(item):
            marks.setdefault("token_handed_over", time.perf_counter())
            return put(item)
        queue.put_nowait = timed_put
        return submit(request, queue, tag)

    def timed_step(*args, **kwargs):
        marks.setdefault("step", time.perf_counter())
        return step(*args, **kwargs)
    service.loop.submit, service.engine.step = timed_submit, timed_step


async def requests_over_http(service, url: str, features, max_tokens: int, marks: dict) -> list[dict]:
    import httpx
    rows = []
    async with httpx.AsyncClient(timeout=60) as h:
        for i, f in enumerate(features):
            marks.clear()
            body = {"model": service.model_name, "prompt": "", "max_tokens": max_tokens, "temperature": 0,
                    "features": f.tolist(), "stream": True}
            t0 = time.perf_counter()
            async with h.stream("POST", f"{url}/v1/completions", json=body) as response:
                marks["headers"] = time.perf_counter()
                async for line in response.aiter_lines():
                    if line.startswith("data") and "first_sse_line" not in marks:
                        marks["first_sse_line"] = time.perf_counter()
            if i > 0:  # the first request opens the connection: untimed
                rows.append({k: 1e3 * (marks[k] - t0) for k in MARKS})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", default="artifacts/http-bench")
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    artifacts = Artifacts.open(args.artifacts)
    m = artifacts.manifest
    image = m.dims.context[0]
    service = ModelService(ServeSettings(artifacts=str(artifacts.path), backend="onnxruntime", device="cpu", rows=8,
                                         prefix_cache_mb=0))
    marks: dict = {}
    instrument(service, marks)
    g = torch.Generator().manual_seed(0)
    features = torch.rand(args.requests + 1, m.context_lens.get(image.name, 8), image.dim, generator=g)
    server = LocalServer(service)
    try:
        rows = asyncio.run(requests_over_http(service, server.url, features, args.max_tokens, marks))
    finally:
        server.stop()
    medians = {k: statistics.median(r[k] for r in rows) for k in MARKS}
    for k in MARKS:
        print(f"{k:>18}: p50 {medians[k]:6.2f} ms after the POST")
    if args.out:
        write_json(args.out, {"date": datetime.date.today().isoformat(), "gpu": "cpu", "commit": git_commit(),
                              "versions": {"torch": torch.__version__, "python": platform.python_version()},
                              "settings": vars(args), "p50_ms_after_post": medians, "rows": rows})


if __name__ == "__main__":
    main()
