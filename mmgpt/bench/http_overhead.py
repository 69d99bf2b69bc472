"""What the HTTP layer adds, on the CPU: the same requests, one at a time, straight into a replica's engine and through
the OpenAI-compatible app on a localhost server (uvicorn, as in each Ray Serve replica; Ray's proxy hop is not in it).

python -m mmgpt.bench http [--artifacts DIR] [--requests 50] [--max-tokens 16] [--out benchmarks/results]

Reports p50 / p99 of the whole request (non-streamed) and of the time to the first streamed token, both ways, and
the p50 differences: the HTTP layer's own overhead (JSON and SSE encoding, detokenization, the event loop handoff).
Both ways run on one event loop after an untimed request, and HTTP on one client whose connection stays open, as
a real client's does: connection setup and client construction are not the server's cost.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import platform
import time

import torch

from mmgpt.bench.results import publish
from mmgpt.bench.serving import percentile
from mmgpt.contract.artifacts import Artifacts, find_latest_artifacts
from mmgpt.runtime.inflight import Request
from mmgpt.serving.local import LocalServer
from mmgpt.serving.service import ModelService, ServeSettings


async def over_http(h, url: str, model: str, features, max_tokens: int, stream: bool) -> float:
    """Seconds to the whole answer, or to the first streamed token, on the client `h` (an httpx.AsyncClient whose
    connection stays open between requests, as the openai client's does)."""
    body = {"model": model, "prompt": "", "max_tokens": max_tokens, "temperature": 0, "features": features,
            "stream": stream}
    t0 = time.perf_counter()
    if not stream:
        (await h.post(f"{url}/v1/completions", json=body)).raise_for_status()
        return time.perf_counter() - t0
    async with h.stream("POST", f"{url}/v1/completions", json=body) as response:
        async for line in response.aiter_lines():
            if '"token_ids": [' in line and '"token_ids": []' not in line:
                return time.perf_counter() - t0
    raise RuntimeError("the stream ended without a token")


async def all_over_http(url: str, model: str, prefixes, max_tokens: int) -> tuple[list[float], list[float]]:
    """Every request whole, then every request streamed, one at a time on one client, after one untimed request
    of each kind (the connection opened, the server's first-request costs paid)."""
    import httpx
    async with httpx.AsyncClient(timeout=60) as h:
        out = []
        for stream in (False, True):
            await over_http(h, url, model, prefixes[0].tolist(), max_tokens, stream)
            out.append([await over_http(h, url, model, p.tolist(), max_tokens, stream) for p in prefixes])
    return out[0], out[1]


async def in_process(service: ModelService, prefix: torch.Tensor, max_tokens: int) -> tuple[float, float]:
    """Seconds to the whole answer and to the first token through the replica's engine thread and asyncio handoff,
    as the app uses them, without HTTP."""
    queue: asyncio.Queue = asyncio.Queue()
    first = None
    t0 = time.perf_counter()
    service.loop.submit(Request(prefix, [service.tokenizer.bos_id], max_tokens), queue, 0)
    while True:
        _, tokens, reason = await queue.get()
        if tokens and first is None:
            first = time.perf_counter() - t0
        if reason is not None:
            return time.perf_counter() - t0, first


async def all_in_process(service: ModelService, prefixes, max_tokens: int) -> list[tuple[float, float]]:
    """The same requests on one event loop, after one untimed request."""
    await in_process(service, prefixes[0], max_tokens)
    return [await in_process(service, p, max_tokens) for p in prefixes]


def run(args) -> dict:
    path = args.artifacts or find_latest_artifacts(args.artifacts_root)
    artifacts = Artifacts.open(path)
    m = artifacts.manifest
    g = torch.Generator().manual_seed(0)
    image = m.dims.context[0]  # serve.py's one continuous context modality
    prefixes = torch.rand(args.requests, m.context_lens.get(image.name, 8), image.dim, generator=g)
    service = ModelService(ServeSettings(artifacts=str(artifacts.path), backend=args.backend, device="cpu",
                                         rows=args.rows, prefix_cache_mb=0))
    direct = asyncio.run(all_in_process(service, prefixes, args.max_tokens))
    direct_total, direct_first = [d[0] for d in direct], [d[1] for d in direct]
    server = LocalServer(service)
    try:
        http_total, http_first = asyncio.run(all_over_http(server.url, service.model_name, prefixes,
                                                           args.max_tokens))
    finally:
        server.stop()

    def stats(values):
        return {"p50_ms": 1e3 * percentile(values, 50), "p99_ms": 1e3 * percentile(values, 99)}
    rows = {"in_process_request": stats(direct_total), "http_request": stats(http_total),
            "in_process_first_token": stats(direct_first), "http_first_token": stats(http_first)}
    return {"date": datetime.date.today().isoformat(), "gpu": "cpu", "device": "cpu", "tag": "http-overhead",
            "versions": {"torch": torch.__version__, "python": platform.python_version()},
            "settings": {"artifacts": str(artifacts.path), "backend": service.engine.backend.name,
                         "requests": args.requests, "max_tokens": args.max_tokens, "rows": args.rows},
            "latency": rows,
            "http_overhead_request_p50_ms": rows["http_request"]["p50_ms"] - rows["in_process_request"]["p50_ms"],
            "http_overhead_first_token_p50_ms": rows["http_first_token"]["p50_ms"]
            - rows["in_process_first_token"]["p50_ms"]}


def markdown_table(report: dict) -> str:
    s = report["settings"]
    lines = [f"CPU, {report['date']}, {s['backend']}, {s['requests']} requests one at a time, {s['max_tokens']} tokens",
             "", "| path | request p50 ms | request p99 ms | first token p50 ms | first token p99 ms |",
             "|---|---:|---:|---:|---:|"]
    for name, kind in (("in process", "in_process"), ("HTTP", "http")):
        r, f = report["latency"][f"{kind}_request"], report["latency"][f"{kind}_first_token"]
        lines.append(f"| {name} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {f['p50_ms']:.2f} | {f['p99_ms']:.2f} |")
    lines += ["", f"HTTP overhead (p50): {report['http_overhead_request_p50_ms']:.2f} ms a request, "
                  f"{report['http_overhead_first_token_p50_ms']:.2f} ms to the first token"]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", default=None, help="default: the newest export under --artifacts-root")
    ap.add_argument("--artifacts-root", default="artifacts")
    ap.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch"])
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    report = run(args)
    publish(args.out, report, markdown_table(report))
    return report


if __name__ == "__main__":
    main()
