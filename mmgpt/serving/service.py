"""One replica's model: artifacts -> backend -> in-flight engine, run in a thread of its own, with the requests'
tokens handed to asyncio queues, and the counters /metrics reports. No HTTP here (app.py), no Ray (deployment.py)."""
from __future__ import annotations

import asyncio
import io
import logging
import secrets
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmgpt.contract.artifacts import Artifacts, find_latest_artifacts
from mmgpt.data.digits import DigitsTask, read_images
from mmgpt.errors import UserError
from mmgpt.model import TEXT
from mmgpt.runtime.backends import open_backend
from mmgpt.runtime.inflight import InflightEngine, PrefixCache, Request, RequestState
from mmgpt.runtime.sampling import SEED_MAX, SamplingConfig
from mmgpt.serving.protocol import APIError, GenerationParams, Limits

log = logging.getLogger(__name__)
RATE_WINDOW_S = 10.0  # tokens/s is averaged over this many seconds


@dataclass(frozen=True)
class ServeSettings:
    """What a replica needs to build its model (picklable: Ray ships it to every replica)."""
    artifacts: str  # an absolute path, resolved by the command
    backend: str = "auto"
    engine_strategy: str | None = None
    device: str = "auto"
    model_name: str | None = None  # default: the artifacts directory's name
    rows: int = 16
    capacity: int | None = None  # default: the manifest's largest capacity bucket
    stream_interval: int = 1
    max_queue: int = 256
    prefix_cache_mb: float = 256.0
    default_max_tokens: int = 16
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)

    @classmethod
    def resolve_artifacts(cls, artifacts: str | None, root: str) -> str:
        return str((Path(artifacts) if artifacts else find_latest_artifacts(root)).resolve())


class EngineLoop:
    """Runs the engine's steps in a thread while requests wait; each request's updates reach the asyncio queue it was
    submitted with as (tag, new tokens, finish_reason or None)."""

    def __init__(self, engine: InflightEngine):
        self.engine = engine
        self.draining = False
        self._stop = False
        self._wake = threading.Condition()
        self.finished = Counter()  # finish reason -> requests
        self._generated: deque[tuple[float, int]] = deque()  # (time, tokens) of recent updates
        self.generated_total = 0
        self._thread = threading.Thread(target=self._run, name="mmgpt-engine", daemon=True)
        self._thread.start()

    def submit(self, request: Request, queue: asyncio.Queue, tag: int) -> RequestState:
        """Raises UserError (a bad request) or QueueFull (too many waiting)."""
        loop = asyncio.get_running_loop()

        def on_update(state: RequestState, tokens: list[int]) -> None:
            if tokens:
                self.generated_total += len(tokens)
                self._generated.append((time.monotonic(), len(tokens)))
            if state.done and not tokens:
                self.finished[state.finish_reason] += 1
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (tag, list(tokens), state.finish_reason))
            except RuntimeError:  # the request's event loop is closed: nobody reads its tokens any more
                state.cancel()

        state = self.engine.submit(request, on_update)
        with self._wake:
            self._wake.notify()
        return state

    def tokens_per_s(self) -> float:
        cutoff = time.monotonic() - RATE_WINDOW_S
        while self._generated and self._generated[0][0] < cutoff:
            self._generated.popleft()
        return sum(n for _, n in self._generated) / RATE_WINDOW_S

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stop and not self.engine.has_work():
                    self._wake.wait()
                if self._stop and not self.engine.has_work():
                    return
            try:
                self.engine.step()
            except Exception:  # noqa: BLE001 -- a failed step ends its requests with an error, the server lives on
                log.exception("decode step failed; its requests end with an error")
                self.engine.abort()

    def shutdown(self, timeout_s: float) -> None:
        """Refuse new requests, let the running and waiting ones finish (up to timeout_s), then stop the thread."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self.engine.has_work() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.engine.has_work():
            self.engine.abort()
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=10)


class ModelService:
    """The artifacts served under one model name."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        artifacts = Artifacts.open(settings.artifacts)
        m = artifacts.manifest
        context = m.dims.context
        if m.dims.decoded.name != TEXT or len(context) != 1 or context[0].kind != "continuous":
            raise UserError(f"{artifacts.path}: serve.py serves models that decode text after one continuous context "
                            f"(images or features); this one's context is {[c.name for c in context]} and it "
                            f"decodes {m.dims.decoded.name!r}: use infer.py (or the Generator) for it")
        self.tokenizer = artifacts.tokenizer
        self.model_name = settings.model_name or artifacts.path.name
        try:
            self.task = DigitsTask.from_data_config(m.data)  # images are preprocessed exactly as in training
        except UserError:
            self.task = None  # a features model: requests send features
        backend = open_backend(settings.backend, artifacts, device=settings.device, strategy=settings.engine_strategy)
        capacity = settings.capacity or min(max(m.capacity_buckets), m.config.block_size)
        budget = int(settings.prefix_cache_mb * 2**20)
        # the weights' hash keys the cache: another export never reads this one's entries
        cache = PrefixCache(budget, namespace=m.weights.sha256_tree) if budget > 0 else None
        self.engine = InflightEngine(backend, self.tokenizer, rows=settings.rows, capacity=capacity,
                                     prefix_cache=cache, stream_interval=settings.stream_interval,
                                     max_queue=settings.max_queue)
        self.feature_dim = context[0].dim
        self.loop = EngineLoop(self.engine)
        self.started = time.time()
        self.requests_total = 0
        self.rejected_total = 0  # queue full or draining
        self.open_responses = 0  # HTTP responses not yet fully sent (the app counts them)
        log.info("serving %s (%s) with %s on %s: %d rows x %d positions", self.model_name, artifacts.path,
                 backend.name, backend.device, settings.rows, capacity)

    def requests_for(self, params: GenerationParams) -> list[Request]:
        """The engine requests of one API request: one per choice, each with its own seed."""
        prefix = self._context(params)
        prompt = [self.tokenizer.bos_id, *self.tokenizer.encode(params.prompt, bos=False)]
        seed = params.seed if params.seed is not None else secrets.randbelow(SEED_MAX + 1)
        out = []
        for i in range(params.n):
            try:
                sampling = SamplingConfig(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                                          seed=(seed + i) % (SEED_MAX + 1))
                request = Request(prefix, prompt, params.max_tokens, sampling)
                self.engine.check(request)
            except UserError as e:
                raise APIError(400, str(e)) from None
            out.append(request)
        return out

    def _context(self, params: GenerationParams) -> torch.Tensor:
        if params.images and params.features is not None:
            raise APIError(400, "give the context as images or as 'features', not both", param="features")
        if params.features is not None:
            return torch.tensor(params.features, dtype=torch.float32)
        if not params.images:
            return torch.zeros(0, self.feature_dim)
        if self.task is None:
            raise APIError(400, "this model was not trained on images: send its context features in the 'features' "
                                "field", param="messages")
        per = self.task.digits_per_sample
        if len(params.images) != per:
            raise APIError(400, f"{len(params.images)} image(s), but this model reads {per} per request (as it was "
                                "trained)", param="messages")
        try:
            prefixes = read_images([io.BytesIO(b) for b in params.images], self.task,
                                   names=[f"image {i + 1}" for i in range(per)])
        except UserError as e:
            raise APIError(400, str(e), param="messages") from None
        return torch.from_numpy(prefixes[0])

    def metrics(self) -> dict[str, float]:
        cache = self.engine.cache
        return {"requests_total": self.requests_total, "requests_rejected_total": self.rejected_total,
                "requests_cancelled_total": self.loop.finished["cancelled"],
                "requests_finished_total": sum(self.loop.finished.values()),
                "generated_tokens_total": self.loop.generated_total, "tokens_per_second": self.loop.tokens_per_s(),
                "queue_depth": self.engine.queue_depth, "active_rows": self.engine.active_rows,
                "rows": self.engine.rows, "prefix_cache_hits_total": cache.hits if cache else 0,
                "prefix_cache_misses_total": cache.misses if cache else 0,
                "prefix_cache_bytes": cache.nbytes if cache else 0}

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Refuse new requests, finish the running ones, and wait until their responses are sent (up to timeout_s:
        the HTTP proxy in front may be stopped right after)."""
        deadline = time.monotonic() + timeout_s
        self.loop.shutdown(timeout_s)
        while self.open_responses > 0 and time.monotonic() < deadline:
            time.sleep(0.05)

