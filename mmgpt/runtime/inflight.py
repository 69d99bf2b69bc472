"""In-flight batching: a running bucket of fixed rows x cache capacity whose rows are request slots.

Requests join free rows between decode steps: joiners that arrive together are prefilled together (grouped by the
lengths of their continuous context; a discrete context is ragged, each row packed) and their keys and values are
written into their own rows' slots, while the other rows keep their state. The decode step (backend execute + KV
write + per-row sampling + count / position / finished update) touches only device tensors of fixed shape, so it is
captured once per engine on a GPU and replayed whatever joins or leaves.
A request leaves on its end token, on its max_tokens or when cancelled; its row is then free for the next joiner.

The host reads the sampled tokens once per window of `stream_interval` steps (one transfer for all rows), which is
all that streaming needs. Sampling noise is a hash of (the request's seed, its token index, the vocabulary index),
so a seeded request draws the same tokens whichever requests it shares the bucket with.

A context's keys and values can be kept in a PrefixCache (keyed by the weights' hash and the context's bytes):
a joiner whose context is cached copies them into its slots and runs only its prompt after them (in one call where
the backend has `prefill_after`, else one token per decode call).
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import threading
import time
import warnings
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from mmgpt.errors import UserError
from mmgpt.runtime.requests import batch_context, capacity_for, check_context, check_token_ids, special_ids
from mmgpt.runtime.sampling import RowSampling, SamplingConfig, row_noise, sample_rows


@dataclass(frozen=True)
class Request:
    """One generation: its context (modality -> (P, F) features, P may be 0, or a token list; a bare (P, F) tensor
    for a model whose context is one continuous modality), prompt ids of the decoded modality, a token budget and
    its sampling."""
    context: dict | torch.Tensor
    prompt: list[int]
    max_tokens: int
    sampling: SamplingConfig = SamplingConfig()


@dataclass
class RequestState:
    """A submitted request as the host sees it. `tokens` holds every generated id, the end token included."""
    id: int
    request: Request
    on_update: Callable[["RequestState", list[int]], None] | None = None  # called from the engine's thread
    context: dict = field(default_factory=dict)  # the request's context, checked: modality -> features or token list
    context_len: int = 0  # its real length: where the prompt starts
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # stop | length | cancelled | error
    row: int | None = None
    cache_key: str | None = None
    cache_hit: bool = False
    submitted_s: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    cancelled: bool = False

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Leave at the next step boundary (thread-safe: a flag the engine reads)."""
        self.cancelled = True


MIN_PROMPT_BUCKET = 8  # captured prefills round prompts up to a power of two, at least this
# cached contexts join at most this many per captured replay: each graph's input holds that many contexts' keys and
# values (354 MB each at 1.5B with a 576-patch image), shared by the graphs of one (joiners, context length)
MAX_HITS_PER_REPLAY = 4


def _by_lengths(states: list["RequestState"]) -> list[list["RequestState"]]:
    """Joiners that can share one prefill: the same length of each continuous modality (a discrete context is
    ragged: any lengths batch together)."""
    groups: dict[tuple, list[RequestState]] = {}
    for s in states:
        key = tuple(v.shape[0] for v in s.context.values() if torch.is_tensor(v))
        groups.setdefault(key, []).append(s)
    return list(groups.values())


def _by_context_len(states: list["RequestState"]) -> list[list["RequestState"]]:
    groups: dict[int, list[RequestState]] = {}
    for s in states:
        groups.setdefault(s.context_len, []).append(s)
    return list(groups.values())


def _greedy(states: list["RequestState"]) -> bool:
    return all(s.request.sampling.greedy for s in states)


def _power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


@dataclass
class _Joiners:
    """What a group of joiners hands the device, per row (J,): its engine row, prompt length, token budget, first
    position after its prompt and sampling. Captured prefills keep one of these at fixed addresses."""
    rows: torch.Tensor
    lengths: torch.Tensor
    limit: torch.Tensor
    start: torch.Tensor
    sampling: RowSampling

    INTS = ("rows", "lengths", "limit", "start")

    @classmethod
    def empty(cls, J: int, device) -> "_Joiners":
        ints = torch.zeros(len(cls.INTS), J, dtype=torch.long, device=device)
        return cls(*ints, RowSampling.empty(J, device))

    @classmethod
    def of(cls, states: list["RequestState"], device) -> "_Joiners":
        joiners = cls.empty(len(states), device)
        joiners.fill(states)
        return joiners

    def fill(self, states: list["RequestState"]) -> None:
        """Copy the states' values in, one per row (as many states as rows)."""
        ints = torch.tensor([[s.row for s in states], [len(s.request.prompt) for s in states],
                             [s.request.max_tokens for s in states],
                             [s.context_len + len(s.request.prompt) for s in states]], dtype=torch.long)
        for name, row in zip(self.INTS, ints.to(self.rows.device)):
            getattr(self, name).copy_(row)
        self.sampling.copy_(RowSampling.of([s.request.sampling for s in states], "cpu"))


@dataclass
class _PrefillGraph:
    """A captured join: prefill, the keys and values written into the joiners' rows, their first tokens sampled and
    their row state set, replayed from static inputs."""
    graph: "torch.cuda.CUDAGraph"
    context: dict[str, torch.Tensor]  # modality -> (J, P, F): captured prefills take continuous contexts only
    past: tuple[torch.Tensor, ...]  # a cached context's keys and values (L, J, H, P, D), or ()
    ids: torch.Tensor  # (J, T)
    joiners: _Joiners
    first: torch.Tensor  # (J,) first tokens


class QueueFull(Exception):
    """More requests wait than the engine's queue allows: the caller should answer 'busy' (HTTP 429 / 503)."""


class PrefixCache:
    """Keys and values of contexts, LRU under a byte budget. The key hashes the weights' identity with each context
    modality's shape and bytes, so another model or another image never hits."""

    def __init__(self, budget_bytes: int, namespace: str):
        if budget_bytes < 0:
            raise UserError(f"prefix cache budget {budget_bytes} bytes must be >= 0 (0 turns the cache off)")
        self.budget, self.namespace = budget_bytes, namespace
        self.entries: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.nbytes = self.hits = self.misses = 0

    def key(self, context: dict) -> str:
        """context: one row's, modality -> (P, F) features or a token list."""
        h = hashlib.sha256(self.namespace.encode())
        for name, value in sorted(context.items()):
            data = value.detach().to("cpu", torch.float32) if torch.is_tensor(value) else torch.tensor(value)
            h.update(f"|{name}|{tuple(data.shape)}|".encode())
            h.update(data.contiguous().numpy().tobytes())
        return h.hexdigest()

    def clear(self) -> None:
        self.entries.clear()
        self.nbytes = self.hits = self.misses = 0

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        entry = self.entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, key: str, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: (L, H, P, D), owned by the cache from now on."""
        size = k.numel() * k.element_size() * 2
        if key in self.entries or size > self.budget:
            return
        while self.nbytes + size > self.budget:
            _, (old_k, old_v) = self.entries.popitem(last=False)
            self.nbytes -= old_k.numel() * old_k.element_size() * 2
        self.entries[key] = (k, v)
        self.nbytes += size


class InflightEngine:
    """Rows x capacity of running requests over one backend. Drive it with `submit` and `step` from one thread (the
    server runs it in its own thread); `cancel` and `submit` are safe from others."""

    def __init__(self, backend, tokenizer, rows: int, capacity: int, cuda_graph: bool | None = None,
                 prefix_cache: PrefixCache | None = None, stream_interval: int = 1, max_queue: int = 1024,
                 capture_prefill: bool | None = None, row_buckets: bool = True):
        """capture_prefill: replay prefills from CUDA graphs, one per (joiners, context lengths, prompt length)
        bucket, joiners and prompt lengths rounded up to powers of two (default: where the decode step is captured
        and the backend's prefill can be).

        row_buckets: a step runs the first power-of-two rows that hold every running request, each bucket its own
        captured graph (off: every step runs all rows, for batches that start and run together).
        While every running row is greedy the step takes the argmax and skips the per-row sampling (a sort of the
        vocabulary per row), which is what greedy rows get from it anyway; the first sampled request brings in the
        sampling step (captured then, once)."""
        self.backend, self.tok = backend, tokenizer
        self.start_id, self.end_id, self.pad_id = special_ids(backend.dims, tokenizer)
        self.device = torch.device(backend.device)
        if rows < 1 or (backend.max_batch is not None and rows > backend.max_batch):
            raise UserError(f"rows={rows} must lie in [1, {backend.max_batch or 'any'}] for the {backend.name} "
                            "backend (an engine profile's max batch, where it has one)")
        if stream_interval < 1:
            raise UserError(f"stream_interval={stream_interval} must be >= 1 (decode steps between host reads)")
        self.rows, self.capacity, self.stream_interval, self.max_queue = rows, capacity, stream_interval, max_queue
        self.row_buckets = row_buckets
        self.use_graph = (self.device.type == "cuda") if cuda_graph is None else cuda_graph
        if self.use_graph and self.device.type != "cuda":
            raise UserError("cuda_graph=True needs a CUDA backend device")
        self.cache = prefix_cache
        ragged = any(m.kind == "discrete" for m in backend.dims.context)  # prefill shapes follow each batch's ids
        capturable = self.use_graph and backend.prefill_capturable and not ragged
        self.capture_prefill = capturable if capture_prefill is None else capture_prefill
        if self.capture_prefill and not capturable:
            raise UserError(f"capture_prefill needs a CUDA device, a backend whose prefill can be captured (torch, "
                            f"torch-triton) and a context without a discrete modality, not {backend.name} on "
                            f"{self.device} with context {[m.name for m in backend.dims.context]}")
        self._prefill_graphs: dict[tuple[int, int, int], _PrefillGraph] = {}
        self._past_inputs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (J, P) -> keys, values
        # all device work on a stream of our own: engines must not run on the legacy default stream
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        d, dev, R = backend.dims, self.device, rows
        shape = (d.n_layer, R, d.n_kv_head, capacity, d.head_dim)
        self.k = torch.zeros(shape, dtype=backend.dtype, device=dev)  # (L, R, H_kv, S, D)
        self.v = torch.zeros(shape, dtype=backend.dtype, device=dev)
        self.token = torch.zeros(R, 1, dtype=torch.long, device=dev)  # last sampled token
        self.position = torch.zeros(R, 1, dtype=torch.long, device=dev)  # where that token goes in the cache
        self.count = torch.zeros(R, dtype=torch.long, device=dev)  # tokens generated so far
        self.max_tokens = torch.ones(R, dtype=torch.long, device=dev)
        self.finished = torch.ones(R, dtype=torch.bool, device=dev)  # free rows count as finished
        self.sampling = RowSampling.empty(R, dev)
        self.window = torch.zeros(R, stream_interval, dtype=torch.long, device=dev)  # tokens since the last read
        self.window_step = torch.zeros(1, dtype=torch.long, device=dev)
        # prompts fed after a cached prefix: buffers of their own, kept, since engines bind tensors by address
        self.feed_token = torch.zeros(R, 1, dtype=torch.long, device=dev)
        self.feed_position = torch.zeros(R, 1, dtype=torch.long, device=dev)
        self.graphs: dict[tuple[bool, int], torch.cuda.CUDAGraph] = {}  # (greedy, rows stepped) -> the step
        self.graph_captures = 0
        self._capture_blocked: str | None = None  # why the step cannot be captured (it then runs eagerly)
        self.slots: list[RequestState | None] = [None] * R
        self.waiting: deque[RequestState] = deque()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.decode_steps = 0
        if self.use_graph:
            with self._on_stream():
                self._capture()

    # ---------------------------------------------------------------- requests
    def check(self, request: Request) -> tuple[dict, int]:
        """Every way a request can be wrong, as a UserError, before it is queued. Returns its context, checked, and
        the context's real length. The features stay where the caller gave them (the host, from the server): the
        loop moves them, because CUDA work from the caller's thread while the loop captures a graph breaks the
        capture (and, unordered with the loop's stream, could race it)."""
        if not isinstance(request.sampling, SamplingConfig):
            raise UserError("sampling must be a SamplingConfig")
        if not request.prompt:
            raise UserError("empty prompt: every request needs at least one token (the BOS token is the usual start)")
        check_token_ids([request.prompt], self.backend.dims.vocab_size)
        given = request.context if isinstance(request.context, dict) else {None: request.context}
        for name, value in given.items():
            if torch.is_tensor(value) and value.ndim != 2:
                raise UserError(f"{name or 'the context'} features must be a (P, F) tensor, got shape "
                                f"{tuple(value.shape)}")
        one = {name: value[None] if torch.is_tensor(value) else [value] for name, value in given.items()}
        context, _, lengths = check_context(self.backend, one[None] if None in one else one, to_device=False)
        capacity_for(self.backend, 1, int(lengths[0]), len(request.prompt), request.max_tokens, [self.capacity])
        return {name: value[0] for name, value in context.items()}, int(lengths[0])

    def submit(self, request: Request, on_update=None) -> RequestState:
        """Queue a request (checked first); it joins a free row at the next step boundary."""
        context, context_len = self.check(request)
        key = None
        if self.cache is not None and context_len > 0:  # hashed here, on the caller's thread and host copy
            raw = request.context if isinstance(request.context, dict) else {self.backend.dims.context[0].name:
                                                                              request.context}
            key = self.cache.key({name: raw[name] if torch.is_tensor(raw[name]) else value
                                  for name, value in context.items()})
        with self._lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting, the most this engine queues")
            state = RequestState(next(self._ids), request, on_update, context, context_len, cache_key=key)
            self.waiting.append(state)
        return state

    @property
    def active_rows(self) -> int:
        return sum(s is not None for s in self.slots)

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        return self.active_rows > 0 or len(self.waiting) > 0

    # ---------------------------------------------------------------- the loop
    @torch.inference_mode()
    def step(self, max_steps: int | None = None) -> None:
        """One scheduling round: free cancelled rows, admit waiting requests into free rows, then run
        `stream_interval` decode steps (fewer if max_steps says so) and hand each request its new tokens."""
        with self._on_stream():
            self._release_cancelled()
            self._admit()
            n = self.stream_interval if max_steps is None else min(max_steps, self.stream_interval)
            if self.active_rows and n > 0:
                greedy = _greedy([s for s in self.slots if s is not None])
                rows = self._row_bucket()
                graph = self._graph(greedy, rows)
                self.window_step.zero_()
                for _ in range(n):
                    graph.replay() if graph is not None else self._decode_step(greedy, rows)
                self.decode_steps += n
                self._collect(n)

    def run(self) -> None:
        """Step until every submitted request is done."""
        while self.has_work():
            self.step()

    def _on_stream(self):
        if self.stream is None:
            return contextlib.nullcontext()
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        return torch.cuda.stream(self.stream)

    def _release_cancelled(self) -> None:
        with self._lock:
            for state in [s for s in self.waiting if s.cancelled]:
                self.waiting.remove(state)
                self._finish(state, "cancelled")
        rows = [r for r, s in enumerate(self.slots) if s is not None and s.cancelled]
        if rows:
            self.finished[rows] = True
            for r in rows:
                self._finish(self.slots[r], "cancelled")

    def abort(self) -> None:
        """End every running and waiting request with finish_reason 'error' (after a failed step: the rows' state is
        unknown), leaving every row free."""
        with self._lock:
            waiting, self.waiting = list(self.waiting), deque()
        for state in [s for s in self.slots if s is not None] + waiting:
            self._finish(state, "error")
        self.finished.fill_(True)

    def _admit(self) -> None:
        free = [r for r, s in enumerate(self.slots) if s is None]
        with self._lock:
            joiners = [self.waiting.popleft() for _ in range(min(len(free), len(self.waiting)))]
        if not joiners:
            return
        for state, row in zip(joiners, free):
            state.row = row
            self.slots[row] = state
        hits, misses = [], []
        for state in joiners:
            cached = None
            if state.cache_key is not None:
                cached = self.cache.get(state.cache_key)
            (hits if cached is not None else misses).append((state, cached))
        if hits and hasattr(self.backend, "prefill_after"):
            entries = {s.row: kv for s, kv in hits}
            for group in _by_context_len([s for s, _ in hits]):
                for state in group:
                    state.cache_hit = True
                self._emit_first(group, self._prefill(group, [entries[s.row] for s in group]))
        elif hits:  # before the prefills: feeding prompts writes stale positions of the rows not yet started
            for state, (k, v) in hits:
                state.cache_hit = True
                P = k.shape[2]
                self.k[:, state.row, :, :P].copy_(k)
                self.v[:, state.row, :, :P].copy_(v)
            group = [s for s, _ in hits]
            joiners = _Joiners.of(group, self.device)
            self._emit_first(group, self._start(joiners, self._feed_prompts(group, joiners.rows), _greedy(group)))
        for group in _by_lengths([s for s, _ in misses]):
            self._emit_first(group, self._prefill(group))

    def _inputs(self, group: list[RequestState], T: int, cached: bool) -> tuple[dict, torch.Tensor]:
        """A join's inputs: the contexts batched on the device ({} after cached contexts), and the prompt ids
        right-padded to T, on the host."""
        ids = torch.full((len(group), T), self.pad_id, dtype=torch.long)
        for j, s in enumerate(group):
            ids[j, : len(s.request.prompt)] = torch.tensor(s.request.prompt)
        if cached:
            return {}, ids
        return batch_context(self.backend.dims, [s.context for s in group], self.device), ids

    def _prefill(self, group: list[RequestState], past: list[tuple] | None = None) -> torch.Tensor:
        """Join a group of requests: one batched prefill of their contexts (which share their continuous lengths)
        or, with `past` (per joiner its cached context's keys and values, (L, H, P, D) each, one P), of their
        prompts after them; the keys and values written into their rows, their first tokens sampled and their
        rows set. One graph replay where prefills are captured (cached contexts at most MAX_HITS_PER_REPLAY at a
        time, which bounds what a graph's input holds). Returns the first tokens (J,) on the device."""
        if past is not None and self.capture_prefill and len(group) > MAX_HITS_PER_REPLAY:
            n = MAX_HITS_PER_REPLAY
            return torch.cat([self._prefill(group[i: i + n], past[i: i + n]) for i in range(0, len(group), n)])
        J, T = len(group), max(len(s.request.prompt) for s in group)
        greedy = _greedy(group)
        if not self.capture_prefill:
            context, ids = self._inputs(group, T, past is not None)
            stacked = None if past is None else tuple(torch.stack(t, 1) for t in zip(*past))  # (L, J, H, P, D)
            first = self._join(context, stacked, ids.to(self.device), _Joiners.of(group, self.device), greedy)
        else:  # continuous contexts only (a discrete one is never captured)
            shapes = (("after", past[0][0].shape[2]) if past is not None else
                      tuple(v.shape[0] for v in group[0].context.values()))
            key = (_power_of_two(J), shapes, max(_power_of_two(T), MIN_PROMPT_BUCKET), greedy)
            if key not in self._prefill_graphs:
                self._prefill_graphs[key] = self._capture_prefill(*key)
            g = self._prefill_graphs[key]
            Jb, Tb = g.ids.shape
            padded = group + [group[0]] * (Jb - J)  # a padded row computes and writes what the first joiner does
            context, ids = self._inputs(padded, Tb, past is not None)
            for name, value in context.items():
                g.context[name].copy_(value)
            for j, entry in enumerate(past + [past[0]] * (Jb - J) if past is not None else ()):
                for buffer, value in zip(g.past, entry):  # each cached entry straight into its joiner's slot
                    buffer[:, j].copy_(value)
            g.ids.copy_(ids)
            g.joiners.fill(padded)
            g.graph.replay()
            first = g.first[:J].clone()  # the next replay of this graph (the next joiner) rewrites g.first
        if self.cache is not None and past is None:
            for state in (s for s in group if s.context_len > 0):
                row, P = state.row, state.context_len
                self.cache.put(state.cache_key, self.k[:, row, :, :P].clone(), self.v[:, row, :, :P].clone())
        return first

    def _join(self, context: dict, past: tuple | None, ids: torch.Tensor, joiners: _Joiners,
              greedy: bool) -> torch.Tensor:
        """Device-only, so it can be captured: prefill (after `past`, written into the rows first), write each
        joiner's row from there (its real slots lie first; the slots after them hold padding's keys, which no
        position reads before a decode step overwrites them), sample, set the rows."""
        if past is None:
            logits, keys, values = self.backend.prefill(context, ids, joiners.lengths)
            start = 0
        else:
            logits, keys, values = self.backend.prefill_after(list(past[0]), list(past[1]), ids, joiners.lengths)
            start = past[0].shape[3]
            for cache, entry in zip((self.k, self.v), past):
                cache[:, :, :, :start].index_copy_(1, joiners.rows, entry.to(cache.dtype))
        n = min(keys[0].shape[2], self.capacity - start)
        for i in range(len(keys)):
            self.k[i, :, :, start: start + n].index_copy_(0, joiners.rows, keys[i][:, :, :n].to(self.k.dtype))
            self.v[i, :, :, start: start + n].index_copy_(0, joiners.rows, values[i][:, :, :n].to(self.v.dtype))
        return self._start(joiners, logits, greedy)

    def _capture_prefill(self, J: int, shapes: tuple, T: int, greedy: bool) -> "_PrefillGraph":
        """shapes: each continuous context modality's length, or ("after", P): prompts after P cached positions."""
        d, dev, dt = self.backend.dims, self.device, self.backend.dtype
        if shapes[0] == "after":
            context = {}
            if (J, shapes[1]) not in self._past_inputs:  # replays run one at a time: their inputs can be shared
                self._past_inputs[J, shapes[1]] = tuple(
                    torch.zeros(d.n_layer, J, d.n_kv_head, shapes[1], d.head_dim, dtype=dt, device=dev)
                    for _ in range(2))
            past = self._past_inputs[J, shapes[1]]
        else:
            context = {m.name: torch.zeros(J, P, m.dim, dtype=dt, device=dev) for m, P in zip(d.context, shapes)}
            past = None
        ids = torch.full((J, T), self.pad_id, dtype=torch.long, device=dev)
        joiners = _Joiners.empty(J, dev)
        joiners.lengths.fill_(1)
        # warm-up of the pure parts (lazy init and cuBLAS handles) outside the capture; _join itself would write the
        # rows of running requests
        logits, _, _ = (self.backend.prefill(context, ids, joiners.lengths) if past is None else
                        self.backend.prefill_after(list(past[0]), list(past[1]), ids, joiners.lengths))
        self._sample(logits, joiners.sampling, torch.zeros_like(joiners.rows), greedy)
        torch.cuda.synchronize(dev)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            first = self._join(context, past, ids, joiners, greedy)
        self.graph_captures += 1
        return _PrefillGraph(graph, context, past or (), ids, joiners, first)

    def _feed_prompts(self, group: list[RequestState], rows: torch.Tensor) -> torch.Tensor:
        """Prompts after a cached prefix, one token per full-bucket decode call. Running rows are fed their own
        current token at its own position: the call writes the key and value that their next step writes anyway,
        and their logits are dropped. A shorter prompt repeats its last token at its last position (idempotent)."""
        longest = max(len(s.request.prompt) for s in group)
        ids, position = self.feed_token, self.feed_position
        ids.copy_(self.token)
        position.copy_(self.position)
        for t in range(longest):
            ids[rows, 0] = torch.tensor([s.request.prompt[min(t, len(s.request.prompt) - 1)] for s in group],
                                        device=self.device)
            position[rows, 0] = torch.tensor([s.context_len + min(t, len(s.request.prompt) - 1)
                                              for s in group], device=self.device)
            logits = self.backend.decode(ids, position, self.k, self.v)
        return logits[rows]

    def _start(self, joiners: _Joiners, logits: torch.Tensor, greedy: bool) -> torch.Tensor:
        """Sample the joiners' first tokens and set their rows' state, on the device -> first tokens (J,)."""
        first = self._sample(logits, joiners.sampling, torch.zeros_like(joiners.rows), greedy)
        rows = joiners.rows
        self.sampling.write(rows, joiners.sampling)
        self.token[:, 0].index_copy_(0, rows, first)
        self.position[:, 0].index_copy_(0, rows, joiners.start)
        self.count.index_fill_(0, rows, 1)
        self.max_tokens.index_copy_(0, rows, joiners.limit)
        self.finished.index_copy_(0, rows, (first == self.end_id) | (joiners.limit <= 1))
        return first

    def _emit_first(self, states: list[RequestState], first: torch.Tensor) -> None:
        """The host reads the first tokens (the time to first token) and hands each to its request."""
        tokens = first.tolist()
        now = time.perf_counter()
        for state, token in zip(states, tokens):
            state.first_token_s = now
            self._emit(state, [token])

    def _row_bucket(self) -> int:
        """The rows a step runs: the first power of two (or all) that holds every running row. Joiners take the
        lowest free rows, so a lightly loaded engine steps a few rows, not all."""
        if not self.row_buckets:
            return self.rows
        return min(self.rows, _power_of_two(1 + max(r for r, s in enumerate(self.slots) if s is not None)))

    def _decode_step(self, greedy: bool, n: int) -> None:
        """One token for each of the first n rows, device-only: execute + KV write, sample, record, advance."""
        token, position, count, finished = self.token[:n], self.position[:n], self.count[:n], self.finished[:n]
        logits = self.backend.decode(token, position, self.k[:, :n], self.v[:, :n])
        nxt = self._sample(logits, self.sampling.head(n), count, greedy)
        nxt = torch.where(finished, torch.full_like(nxt, self.end_id), nxt)  # finished rows emit the end token
        self.window[:n].scatter_(1, self.window_step.expand(n, 1), nxt[:, None])
        live = (~finished).long()
        count.add_(live)
        position.add_(live[:, None])
        finished.logical_or_((nxt == self.end_id) | (count >= self.max_tokens[:n]))
        token.copy_(nxt[:, None])
        self.window_step.add_(1)

    @staticmethod
    def _sample(logits: torch.Tensor, sampling: RowSampling, counter: torch.Tensor, greedy: bool) -> torch.Tensor:
        if greedy:  # every row greedy: sample_rows would return this argmax
            return logits.argmax(dim=-1)
        return sample_rows(logits, sampling, row_noise(sampling.seed, counter, logits.shape[-1]))

    def _collect(self, n: int) -> None:
        """One host read per window: each live row's new tokens are the first (count - emitted) of the window."""
        snapshot = torch.cat([self.window[:, :n], self.count[:, None], self.finished[:, None].long()], 1).tolist()
        for r, state in enumerate(self.slots):
            if state is None:
                continue
            *window, count, finished = snapshot[r]
            new = window[: count - len(state.tokens)]
            if new:
                self._emit(state, new)  # a row finishes on a token it emits: _emit sees it

    def _emit(self, state: RequestState, tokens: list[int]) -> None:
        state.tokens += tokens
        if state.on_update is not None:
            state.on_update(state, tokens)
        if state.tokens[-1] == self.end_id or len(state.tokens) >= state.request.max_tokens:
            self._finish(state, "stop" if state.tokens[-1] == self.end_id else "length")

    def _finish(self, state: RequestState, reason: str) -> None:
        if state.done:
            return
        state.finish_reason = reason
        if state.row is not None:
            self.slots[state.row] = None
        if state.on_update is not None:
            state.on_update(state, [])

    # ---------------------------------------------------------------- capture
    def _capture(self) -> None:
        """Warm the step up on idle rows (every row finished at position 0, so its writes stay in range and change
        nothing a joiner reads), then capture the greedy step; where the backend cannot be captured, warn and run
        eagerly."""
        # lazy init, compilation, cuBLAS handles, TensorRT's shape-dependent setup: the sampled step runs all that the
        # greedy one does; each step writes the window's column window_step, so every warm-up starts at column 0
        for n in self._buckets:
            self.window_step.zero_()
            self._decode_step(False, n)
        torch.cuda.synchronize(self.device)
        blocker = getattr(self.backend, "capture_blocker", None)
        reason = blocker(self.token, self.position, self.k, self.v) if blocker else None
        if reason is not None:
            self._no_graph(reason)
        for n in self._buckets:
            self._graph(True, n)
        self.count.zero_()
        self.position.zero_()
        self.finished.fill_(True)

    @property
    def _buckets(self) -> list[int]:
        return sorted({min(self.rows, 1 << i) for i in range(self.rows.bit_length())} | {self.rows}) \
            if self.row_buckets else [self.rows]

    def _graph(self, greedy: bool, n: int) -> "torch.cuda.CUDAGraph | None":
        """The captured step of the first n rows, captured at its first use (capturing runs nothing, so rows may be
        running; every bucket was warmed up at start)."""
        if not self.use_graph or self._capture_blocked is not None:
            return None
        if (greedy, n) not in self.graphs:
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, stream=self.stream):
                    self._decode_step(greedy, n)
            except Exception as e:  # noqa: BLE001 -- reported; the step runs un-captured instead
                reason = f"{type(e).__name__}: {e}"
                if e.__context__ is not None:
                    reason += f" (during capture: {e.__context__})"
                torch.cuda.synchronize(self.device)
                self._no_graph(reason)
                return None
            self.graphs[greedy, n] = graph
            self.graph_captures += 1
        return self.graphs[greedy, n]

    def _no_graph(self, reason: str) -> None:
        self._capture_blocked = reason
        warnings.warn(f"decode step for {self.rows} rows, capacity {self.capacity} runs without a CUDA graph "
                      f"(slower, same tokens): {reason}", RuntimeWarning, stacklevel=4)
