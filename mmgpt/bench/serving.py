"""Serving benchmark: the in-flight engine in process (no HTTP, no Ray), under Poisson load, against static batching.

python -m mmgpt.bench serving [--small 124m] [--large 1p5b] [--rates 8 32 128] [--requests 100] [--rows 64]
                              [--out benchmarks/results] [--smoke]

1. Time to first token at the small shape, batch 1, a P-patch image prefix: prefill eager and captured.
2. Load at the small shape: requests arrive as a Poisson process at each rate, with text prompts of mixed length and
   mixed output lengths (random weights rarely emit the end token, so each request runs to its max_tokens).
   In-flight: requests join free rows between steps and stream every token. Static: whenever the generator is idle,
   the requests that have arrived form one batch (at most `rows`) that runs until its longest request is done.
   Throughput counts each request's own tokens over the makespan; TTFT is first token - arrival; ITL is the time
   between a request's successive tokens (static: the batch's decode time per step).
3. Prefix cache at the large shape: requests whose P-patch images each come 8 times, at the middle rate, cache on
   and off: p50 TTFT of the two.
`--smoke` runs tiny CPU shapes that only check the report is well formed (speed is never asserted).
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import threading
import time

import torch

from mmgpt.bench.decode import DTYPES, SHAPES, build_model, versions
from mmgpt.bench.results import publish
from mmgpt.runtime.backends import Backend
from mmgpt.runtime.backends.torch_model import TorchBackend
from mmgpt.runtime.generator import Generator
from mmgpt.runtime.inflight import InflightEngine, PrefixCache, Request
from mmgpt.tokenizer import ByteTokenizer

REPEATS_OF_AN_IMAGE = 8


def open_backend_for(model, name: str) -> Backend:
    if name == "torch-triton":
        from mmgpt.runtime.backends.fused_triton import TritonBackend
        return TritonBackend(model)
    return TorchBackend(model)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))] if values else float("nan")


def workload(n: int, rate: float, prompts: tuple[int, int], outputs: tuple[int, int], vocab: int, seed: int,
             prefix_len: int = 0, prefix_dim: int = 1, images: int | None = None):
    """(arrival time, Request) pairs: Poisson arrivals, uniform prompt and output lengths, and either no prefix or
    images drawn from `images` distinct ones (each used n / images times)."""
    g = torch.Generator().manual_seed(seed)
    gaps = torch.empty(n).exponential_(rate, generator=g)
    arrivals = torch.cumsum(gaps, 0) - gaps[0]
    pool = [torch.rand(prefix_len, prefix_dim, generator=g) for _ in range(images or 1)]
    order = torch.randperm(n, generator=g) % (images or 1)
    out = []
    for i in range(n):
        T = int(torch.randint(prompts[0], prompts[1] + 1, (1,), generator=g))
        m = int(torch.randint(outputs[0], outputs[1] + 1, (1,), generator=g))
        prompt = torch.randint(0, vocab - 1, (T,), generator=g).tolist()
        prefix = pool[int(order[i])] if images else torch.zeros(0, prefix_dim)
        out.append((float(arrivals[i]), Request(prefix, prompt, m)))
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_inflight(engine: InflightEngine, jobs) -> dict:
    """Submit each request at its arrival time from a client thread (as the server's request handlers do, so a
    prefix-cache key is hashed off the engine's loop), step the engine on this one, and time every token's arrival
    on the host. TTFT counts from the scheduled arrival, so it includes the submit."""
    times: dict[int, list[float]] = {}
    arrival: dict[int, float] = {}
    captured = engine.graph_captures

    def on_update(state, tokens):
        if tokens:
            times.setdefault(state.id, []).extend([time.perf_counter()] * len(tokens))

    failed: list[BaseException] = []

    def client():
        try:
            for t, request in jobs:
                time.sleep(max(0.0, start + t - time.perf_counter()))
                arrival[engine.submit(request, on_update).id] = start + t
        except BaseException as e:  # re-raised below: a run missing requests must not report
            failed.append(e)
    start = time.perf_counter()
    submitter = threading.Thread(target=client, daemon=True)
    submitter.start()
    while submitter.is_alive() or engine.has_work():
        if engine.has_work():
            engine.step()
        else:
            time.sleep(1e-4)
    submitter.join()
    if failed:
        raise failed[0]
    end = time.perf_counter()
    ttft = [times[i][0] - arrival[i] for i in arrival]
    itl = [b - a for i in arrival for a, b in zip(times[i], times[i][1:])]
    tokens = sum(len(v) for v in times.values())
    return summary(tokens, end - start, ttft, itl) | {
        "prefix_cache_hits": engine.cache.hits if engine.cache else 0,
        "graph_captures": engine.graph_captures - captured}  # during the run: each one stalls every running row


WARM_UP_PASSES = 4


def warm_up(engine: InflightEngine, jobs) -> int:
    """Run warm-up workloads (jobs(seed): other requests than the timed ones) until one captures no new graph, at
    most WARM_UP_PASSES: a join graph is captured at its first (joiners, lengths, cache hit) bucket, and a capture
    inside a timed run would be timed as the requests' wait. The cache is emptied after each pass. -> passes run."""
    for n in range(1, WARM_UP_PASSES + 1):
        before = engine.graph_captures
        run_inflight(engine, jobs(100 - n))
        if engine.cache is not None:
            engine.cache.clear()
        if engine.graph_captures == before:
            break
    return n


def run_static(gen: Generator, jobs, rows: int, device) -> dict:
    """Batches of whatever has arrived, each run to completion before the next starts."""
    ttft, itl, tokens = [], [], 0
    start = time.perf_counter()
    pending = list(jobs)
    while pending:
        now = time.perf_counter() - start
        if pending[0][0] > now:
            time.sleep(pending[0][0] - now)
            continue
        batch = []
        while pending and pending[0][0] <= now and len(batch) < rows:
            batch.append(pending.pop(0))
        t0 = time.perf_counter()
        # rows padded to a power of two with copies of the first: one engine (and graph) per size, as a static
        # server buckets its batches, so that memory stays bounded
        padded = [r for _, r in batch] + [batch[0][1]] * ((1 << (len(batch) - 1).bit_length()) - len(batch))
        prefix = torch.stack([r.context for r in padded]).to(device)
        result = gen.generate(prefix, [r.prompt for r in padded], max_new_tokens=max(r.max_tokens for r in padded))
        step = result.decode_time_s / max(result.decode_steps, 1)
        for b, (t, r) in enumerate(batch):
            n = min(int(result.num_generated[b]), r.max_tokens)  # its own tokens, up to an end token
            ttft.append(t0 + result.time_to_first_token_s - (start + t))
            itl += [step] * (n - 1)
            tokens += n
    return summary(tokens, time.perf_counter() - start, ttft, itl)


def summary(tokens: int, seconds: float, ttft: list[float], itl: list[float]) -> dict:
    return {"throughput_tok_s": tokens / seconds, "ttft_p50_ms": 1e3 * percentile(ttft, 50),
            "ttft_p99_ms": 1e3 * percentile(ttft, 99), "itl_p50_ms": 1e3 * percentile(itl, 50),
            "itl_p99_ms": 1e3 * percentile(itl, 99), "tokens": tokens, "seconds": seconds}


def time_to_first_token(backend, tok, prefix_len: int, capacity: int, captured: bool, repeats: int) -> float:
    """Median ms from submit to the first token on the host, batch 1, prefix of prefix_len patches."""
    engine = InflightEngine(backend, tok, rows=1, capacity=capacity, capture_prefill=captured)
    prefix = torch.rand(prefix_len, backend.dims.context[0].dim)
    times = []
    for _ in range(repeats + 2):  # the first two capture and settle
        sync(engine.device)
        t0 = time.perf_counter()
        engine.submit(Request(prefix, [tok.bos_id], 1))
        engine.step(max_steps=0)
        times.append(time.perf_counter() - t0)
        engine.run()
    return 1e3 * statistics.median(times[2:])


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    capacity = 1024 if not args.smoke else 256
    report = {"date": datetime.date.today().isoformat(),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "device": str(device), "tag": "serving" + ("-smoke" if args.smoke else ""), "versions": versions(device),
              "settings": {k: v for k, v in vars(args).items()}, "ttft": [], "load": [], "prefix_cache": None}
    tok = ByteTokenizer() if args.vocab <= 258 else ByteTokenizer(bos_id=args.vocab - 1, eos_id=args.vocab - 1,
                                                                   pad_id=args.vocab - 1)
    if "ttft" in args.parts or "load" in args.parts:
        small = build_model(args.small, dtype, device, vocab=args.vocab, block=capacity)
        backend = open_backend_for(small, args.backend)
        if "ttft" in args.parts:
            for c in [False, True] if device.type == "cuda" else [False]:
                ms = time_to_first_token(backend, tok, args.prefix, capacity, c, args.repeats)
                report["ttft"].append({"model": args.small, "batch": 1, "prefix_len": args.prefix,
                                       "backend": backend.name, "prefill": "captured" if c else "eager", "ttft_ms": ms})
                print(f"TTFT {args.small} B=1 P={args.prefix} {'captured' if c else 'eager'}: {ms:.2f} ms", flush=True)
        if "load" in args.parts:
            report["load"] = load_rows(args, small, backend, tok, capacity, device)
        del backend, small
    if "prefix" in args.parts:
        report["prefix_cache"] = prefix_cache_row(args, tok, dtype, capacity, device)
    return report


def load_rows(args, small, backend, tok, capacity: int, device) -> list[dict]:
    """Poisson load at each rate, in-flight against static batching, on the small shape."""
    engine = InflightEngine(backend, tok, rows=args.rows, capacity=capacity, stream_interval=args.stream_interval)
    gen = Generator(backend, tok, capacity_buckets=[capacity])

    def jobs(rate, seed):
        return workload(args.requests, rate, tuple(args.prompts), tuple(args.outputs), args.vocab, seed=seed,
                        prefix_dim=small.config.context_modalities[0].dim)
    # warm-up on other requests: both schedulers capture their graphs (join and step buckets) before any timing
    warm_up(engine, lambda seed: jobs(args.rates[-1], seed))
    run_static(gen, jobs(args.rates[-1], 99), args.rows, device)
    rows = []
    for rate in args.rates:
        timed = jobs(rate, 1)
        row = {"model": args.small, "rate_req_s": rate, "inflight": run_inflight(engine, timed),
               "static": run_static(gen, timed, args.rows, device)}
        row["throughput_ratio"] = row["inflight"]["throughput_tok_s"] / row["static"]["throughput_tok_s"]
        rows.append(row)
        print(f"rate {rate}: in-flight {row['inflight']['throughput_tok_s']:.0f} tok/s, static "
              f"{row['static']['throughput_tok_s']:.0f} tok/s", flush=True)
    return rows


def prefix_cache_row(args, tok, dtype, capacity: int, device) -> dict:
    """The large shape at the middle rate, each image REPEATS_OF_AN_IMAGE times: p50 TTFT with the cache on / off."""
    large = build_model(args.large, dtype, device, vocab=args.vocab, block=capacity)
    backend = open_backend_for(large, args.backend)
    rate = args.rates[len(args.rates) // 2]
    n = args.prefix_requests

    def jobs(seed):
        return workload(n, rate, tuple(args.prompts), tuple(args.outputs), args.vocab, seed=seed,
                        prefix_len=args.prefix, prefix_dim=large.config.context_modalities[0].dim,
                        images=max(1, n // REPEATS_OF_AN_IMAGE))
    result = {}
    for on in (True, False):
        cache = PrefixCache(8 << 30, namespace=f"bench-{args.large}") if on else None
        engine = InflightEngine(backend, tok, rows=args.rows, capacity=capacity, prefix_cache=cache,
                                stream_interval=args.stream_interval)
        warm_up(engine, jobs)  # other images: every graph captured, then the cache starts empty
        result["on" if on else "off"] = run_inflight(engine, jobs(2))
        del engine
    result.update(model=args.large, rate_req_s=rate, repeats_of_an_image=REPEATS_OF_AN_IMAGE,
                  ttft_p50_ratio=result["on"]["ttft_p50_ms"] / result["off"]["ttft_p50_ms"])
    print(f"prefix cache {args.large} at {rate} req/s: p50 TTFT ratio on/off {result['ttft_p50_ratio']:.2f}")
    return result


def markdown_table(report: dict) -> str:
    """The parts the report holds (--parts runs some of them)."""
    lines = [f"{report['gpu']}, {report['date']}, {report['settings']['dtype']}, in process (no HTTP)"]
    if report["ttft"]:
        lines += ["", "| model | prefill | TTFT ms (B=1, P=%d) |" % report["settings"]["prefix"], "|---|---|---:|"]
        lines += [f"| {r['model']} | {r['prefill']} | {r['ttft_ms']:.2f} |" for r in report["ttft"]]
    if report["load"]:
        lines += ["", "| rate req/s | scheduler | tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |",
                  "|---:|---|---:|---:|---:|---:|---:|"]
    for r in report["load"]:
        for kind in ("inflight", "static"):
            m = r[kind]
            lines.append(f"| {r['rate_req_s']} | {kind} | {m['throughput_tok_s']:.0f} | {m['ttft_p50_ms']:.1f} | "
                         f"{m['ttft_p99_ms']:.1f} | {m['itl_p50_ms']:.2f} | {m['itl_p99_ms']:.2f} |")
    p = report["prefix_cache"]
    if p is not None:
        lines += ["", f"prefix cache, {p['model']}, each image {p['repeats_of_an_image']} times at {p['rate_req_s']} "
                      f"req/s: p50 TTFT {p['on']['ttft_p50_ms']:.1f} ms on, {p['off']['ttft_p50_ms']:.1f} ms off: "
                      f"ratio {p['ttft_p50_ratio']:.2f}"]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", default="124m", choices=list(SHAPES))
    ap.add_argument("--large", default="1p5b", choices=list(SHAPES))
    ap.add_argument("--dtype", default="fp16", choices=list(DTYPES))
    ap.add_argument("--backend", default="torch-triton", choices=["torch", "torch-triton"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prefix", type=int, default=576, help="image patches of the TTFT and prefix-cache runs")
    ap.add_argument("--rates", nargs="+", type=float, default=[8.0, 32.0, 128.0])
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--prefix-requests", type=int, default=64)
    ap.add_argument("--prompts", nargs=2, type=int, default=[8, 64], help="prompt length range")
    ap.add_argument("--outputs", nargs=2, type=int, default=[16, 256], help="output length range")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--stream-interval", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20, help="TTFT samples")
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--parts", nargs="+", default=["ttft", "load", "prefix"], choices=["ttft", "load", "prefix"])
    ap.add_argument("--smoke", action="store_true", help="tiny CPU shapes that check the report's form")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    if args.smoke:
        args.small = args.large = "smoke"
        args.dtype, args.prefix, args.rates, args.requests, args.prefix_requests = "fp32", 16, [50.0, 200.0], 12, 16
        args.prompts, args.outputs, args.rows, args.repeats, args.vocab = [2, 8], [4, 12], 4, 2, 512
        args.backend = "torch"
    report = run(args)
    publish(args.out, report, markdown_table(report))
    return report


if __name__ == "__main__":
    main()
