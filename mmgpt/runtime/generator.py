"""The decode loop: prefill once, then one CUDA graph per (batch, cache-capacity) bucket, replayed per token.

gpt-fast style: the KV cache is a static (L, B, H, S, D) buffer written in place at each row's position; every
decode step (backend execute + KV write + sampling + position / finished update) touches only device tensors, so
on a GPU it is captured once per bucket and replayed. The host looks at the finished flags every
`eos_check_interval` steps, never per token. Without a GPU the same step runs un-captured.
"""
from __future__ import annotations

import operator
import time
import warnings
from dataclasses import dataclass, field

import torch

from mmgpt.data.samples import right_pad
from mmgpt.model import TEXT
from mmgpt.runtime.sampling import SamplingConfig, sample
from mmgpt.errors import UserError

DEFAULT_BUCKETS = (64, 128, 256, 512, 1024)


def check_features(features, dtype: torch.dtype | None = None, what: str = "features") -> torch.Tensor:
    """A (B, P, F) float tensor with B, F >= 1 (P = 0: no context of this modality), finite in `dtype`, the dtype
    the backend runs (a value that fits float32 may overflow float16)."""
    if not torch.is_tensor(features) or features.ndim != 3 or features.shape[0] < 1 or features.shape[2] < 1:
        raise UserError(f"{what} must be a (B, P, F) tensor with B >= 1 and F >= 1, got shape "
                        f"{tuple(getattr(features, 'shape', ()))}")
    if not features.is_floating_point():
        raise UserError(f"{what} must be a float tensor, got {features.dtype}")
    if dtype is not None and not bool(torch.isfinite(features.to(dtype)).all()):
        raise UserError(f"{what}: NaN or infinite values in the model's dtype "
                        f"{str(dtype).removeprefix('torch.')} (the largest float16 is "
                        f"{torch.finfo(torch.float16).max:.0f}); scale or clean the features")
    return features


def check_token_ids(prompts, vocab_size: int, what: str = "prompt") -> list[list[int]]:
    """Every id must index a row of the embedding table (out of range: an index error on a GPU, or garbage).
    Returns the prompts as lists of Python ints."""
    out = []
    for b, p in enumerate(prompts):
        ids, bad = [], []
        for i in p:
            try:
                v = operator.index(i)  # int, numpy and 0-d tensor integers; not floats
            except TypeError:
                v = None
            if v is None or isinstance(i, bool) or not 0 <= v < vocab_size:
                bad.append(i)
            else:
                ids.append(v)
        if bad:
            raise UserError(f"{what} {b} holds token id(s) {bad[:5]} that are not integers in its modality's "
                            f"vocabulary [0, {vocab_size}); encode text with the artifacts' tokenizer")
        out.append(ids)
    return out


def token_rows(value, what: str) -> list:
    """A discrete context as token lists: given as lists, or as (ids (B, T) right-padded, lengths (B,))."""
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(torch.is_tensor(v) for v in value):
        ids, lengths = value
        if ids.ndim != 2 or lengths.shape != ids.shape[:1] or bool(((lengths < 0) | (lengths > ids.shape[1])).any()):
            raise UserError(f"{what}: (ids, lengths) must be (B, T) ids and (B,) lengths in [0, T], got shapes "
                            f"{tuple(ids.shape)} and {tuple(lengths.shape)}")
        return [row[:n] for row, n in zip(ids.tolist(), lengths.tolist())]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(r, (list, tuple)) for r in value):
        raise UserError(f"{what}: give one list of token ids per row (or (ids, lengths) tensors)")
    return list(value)


@dataclass
class GenerationResult:
    tokens: torch.Tensor  # (B, n) generated ids, end-padded after a row finished (CPU)
    num_generated: torch.Tensor  # (B,) tokens up to and including the first end token
    sequences: list[list[int]]  # each row's generated ids before its end token
    texts: list[str]  # each row decoded by the tokenizer where the decoded modality is text, else empty
    time_to_first_token_s: float
    decode_time_s: float
    decode_steps: int  # steps after the first token, summed over nothing: one step = B tokens
    backend: str
    capacity: int
    cuda_graph: bool

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second over the decode steps (all rows counted, batch included)."""
        return self.decode_steps * self.tokens.shape[0] / self.decode_time_s if self.decode_time_s > 0 else 0.0


@dataclass
class _Bucket:
    """Static buffers of one (batch, capacity) bucket, and its captured graph."""
    k: torch.Tensor  # (L, B, H, S, D)
    v: torch.Tensor
    token: torch.Tensor  # (B, 1) last sampled token
    position: torch.Tensor  # (B, 1) where that token goes in the cache
    finished: torch.Tensor  # (B,) bool
    out: torch.Tensor  # (B, S) generated tokens
    step: torch.Tensor  # (1,) index into out
    graphs: dict = field(default_factory=dict)  # sampling key -> torch.cuda.CUDAGraph, or None: runs un-captured


class Generator:
    def __init__(self, backend, tokenizer, capacity_buckets=DEFAULT_BUCKETS,
                 max_positions: int | None = None, cuda_graph: bool | None = None, eos_check_interval: int = 8):
        self.backend, self.tok = backend, tokenizer
        decoded = backend.dims.decoded
        self.text = decoded.name == TEXT
        # a non-text modality's end token also starts its sequences and pads its prompts, as GPT-2's <|endoftext|>
        self.end_id = tokenizer.eos_id if self.text else decoded.end_id
        self.start_id, self.pad_id = (tokenizer.bos_id, tokenizer.pad_id) if self.text else (self.end_id, self.end_id)
        self.device = torch.device(backend.device)
        limit = max_positions or max(capacity_buckets)
        self.buckets = sorted({min(int(s), limit) for s in capacity_buckets})
        self.use_graph = (self.device.type == "cuda") if cuda_graph is None else cuda_graph
        if self.use_graph and self.device.type != "cuda":
            raise UserError("cuda_graph=True needs a CUDA backend device")
        self.eos_check_interval = eos_check_interval
        # all device work on a stream of our own: engines must not run on the legacy default stream
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._state: dict[tuple[int, int], _Bucket] = {}
        self._rng = torch.Generator(device=self.device)
        self.graph_captures = 0  # how many CUDA graphs were captured over this generator's life

    # ---------------------------------------------------------------- inputs
    def prepare_context(self, context) -> tuple[dict, int, torch.Tensor]:
        """The context checked against the model's -> on the device, the batch size, each row's real length (B,).

        context: modality -> features (B, P, F) or token lists / (ids, lengths); a bare tensor for a model whose
        context is one continuous modality."""
        be, dims = self.backend, self.backend.dims
        if not isinstance(context, dict):
            if len(dims.context) != 1 or dims.context[0].kind != "continuous":
                raise UserError(f"the model's context is {[m.name for m in dims.context]}: pass a dict with each "
                                "modality's input")
            context = {dims.context[0].name: context}
        names = [m.name for m in dims.context]
        if sorted(context) != sorted(names):
            raise UserError(f"the context holds {sorted(context)}, the model's is {names}; give each one's input")
        out, lengths, batch = {}, [], set()
        for m in dims.context:
            value = context[m.name]
            if m.kind == "continuous":
                check_features(value, be.dtype, what=f"{m.name} features")
                B, P, F = value.shape
                if F != m.dim:
                    raise UserError(f"{m.name} features have F={F}, but the model expects F={m.dim}")
                fixed = be.context_lens.get(m.name)
                if fixed is not None and P != fixed:
                    raise UserError(f"{m.name} length P={P}, but the exported graphs expect P={fixed}")
                out[m.name] = value.to(self.device)
                lengths.append(torch.full((B,), P, dtype=torch.long))
            else:
                rows = check_token_ids(token_rows(value, f"{m.name} context"), m.vocab_size, f"{m.name} context row")
                ids, n = right_pad(rows, m.end_id if m.end_id is not None else 0)
                B = len(rows)
                out[m.name] = (ids.to(self.device), n.to(self.device))
                lengths.append(n)
            batch.add(B)
        if len(batch) > 1:
            raise UserError(f"the context's modalities have different batch sizes {sorted(batch)}; give one row each")
        B = batch.pop() if batch else 1
        return out, B, torch.stack(lengths).sum(0) if lengths else torch.zeros(B, dtype=torch.long)

    def prepare(self, prompts: list[list[int]] | None, batch: int):
        """Right-pad prompts of the decoded modality -> input_ids (B, T), input_lengths (B,). Default: its start
        token ([BOS] for text, the end token for another modality)."""
        prompts = prompts or [[self.start_id]] * batch
        if len(prompts) != batch:
            raise UserError(f"{len(prompts)} prompts for a context batch of {batch}; give one prompt per row")
        if any(len(p) == 0 for p in prompts):
            raise UserError("empty prompt: every row needs at least one token (the BOS token is the usual start)")
        ids, lengths = right_pad(check_token_ids(prompts, self.backend.dims.vocab_size), self.pad_id)
        return ids.to(self.device), lengths.to(self.device)

    def capacity_for(self, batch: int, context_len: int, prompt_len: int, max_new_tokens: int) -> int:
        """Validate sizes before anything runs; returns the capacity bucket to use."""
        be = self.backend
        if be.max_batch is not None and batch > be.max_batch:
            raise UserError(f"batch {batch} exceeds the {be.name} backend's max batch {be.max_batch}; split the "
                            "batch (infer.py does) or, for engines, rebuild with a larger engine.profiles.batch")
        if max_new_tokens < 1:
            raise UserError(f"max_new_tokens={max_new_tokens} must be >= 1")
        need = context_len + prompt_len + max_new_tokens
        for s in self.buckets:
            if need <= s:
                return s
        raise UserError(f"context ({context_len}) + prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) = "
                        f"{need} exceeds the largest cache capacity {self.buckets[-1]}; lower max_new_tokens to "
                        f"{self.buckets[-1] - context_len - prompt_len} or less")

    # ---------------------------------------------------------------- buffers and graphs
    def _bucket(self, B: int, S: int) -> _Bucket:
        key = (B, S)
        if key not in self._state:
            be, dev = self.backend, self.device
            shape = (be.dims.n_layer, B, be.dims.n_head, S, be.dims.head_dim)
            self._state[key] = _Bucket(
                k=torch.zeros(shape, dtype=be.dtype, device=dev), v=torch.zeros(shape, dtype=be.dtype, device=dev),
                token=torch.zeros(B, 1, dtype=torch.long, device=dev),
                position=torch.zeros(B, 1, dtype=torch.long, device=dev),
                finished=torch.zeros(B, dtype=torch.bool, device=dev),
                out=torch.full((B, S), self.end_id, dtype=torch.long, device=dev),
                step=torch.zeros(1, dtype=torch.long, device=dev))
        return self._state[key]

    def _decode_step(self, st: _Bucket, sampling: SamplingConfig) -> None:
        """One token for every row, device-only: execute + KV write, sample, record, advance."""
        logits = self.backend.decode(st.token, st.position, st.k, st.v)
        nxt = sample(logits, sampling, self._rng)
        nxt = torch.where(st.finished, torch.full_like(nxt, self.end_id), nxt)  # finished rows emit the end token
        st.out.scatter_(1, st.step.expand(nxt.shape[0], 1), nxt[:, None])
        st.finished.logical_or_(nxt == self.end_id)
        st.token.copy_(nxt[:, None])
        st.position.add_(1)
        st.step.add_(1)

    def _graph(self, st: _Bucket, sampling: SamplingConfig):
        """The bucket's captured decode step for this sampling setup, capturing it on first use; None where the
        backend cannot be captured (the step then runs un-captured, with a warning saying why)."""
        key = (sampling.temperature == 0, sampling.temperature, sampling.top_k, sampling.top_p)
        if key not in st.graphs:
            # Warm up first (lazy init, compilation, cuBLAS handles, TensorRT's shape-dependent setup), then
            # capture. Both run on dummy state: the next prefill overwrites everything the step reads.
            # Position 0 keeps writes in range.
            st.position.zero_()
            st.step.zero_()
            self._decode_step(st, sampling)
            torch.cuda.synchronize(self.device)
            st.position.zero_()
            st.step.zero_()
            blocker = getattr(self.backend, "capture_blocker", None)
            reason = blocker(st.token, st.position, st.k, st.v) if blocker else None
            graph = None
            if reason is None:
                graph = torch.cuda.CUDAGraph()
                if not sampling.greedy:
                    graph.register_generator_state(self._rng)
                try:
                    with torch.cuda.graph(graph, stream=self.stream):
                        self._decode_step(st, sampling)
                    self.graph_captures += 1
                except Exception as e:  # noqa: BLE001 -- reported; the step runs un-captured instead
                    reason = f"{type(e).__name__}: {e}"
                    if e.__context__ is not None:
                        reason += f" (during capture: {e.__context__})"
                    graph = None
                    torch.cuda.synchronize(self.device)
            if reason is not None:
                warnings.warn(f"decode step for batch {st.k.shape[1]}, capacity {st.k.shape[3]} runs without a "
                              f"CUDA graph (slower, same tokens): {reason}", RuntimeWarning, stacklevel=3)
            st.graphs[key] = graph
        return st.graphs[key]

    # ---------------------------------------------------------------- generate
    @torch.inference_mode()
    def generate(self, context, prompts: list[list[int]] | None = None, max_new_tokens: int = 32,
                 sampling: SamplingConfig = SamplingConfig()) -> GenerationResult:
        """Prefill the context and the prompts of the decoded modality, then decode up to max_new_tokens.

        context: modality -> features (B, P, F), or token lists (or (ids, lengths)) of a discrete modality; a bare
        (B, P, F) tensor for a model whose context is one continuous modality."""
        context, B, context_len = self.prepare_context(context)
        input_ids, input_lengths = self.prepare(prompts, B)
        S = self.capacity_for(B, int(context_len.max()), input_ids.shape[1], max_new_tokens)
        start = (context_len.to(self.device) + input_lengths)[:, None]  # each row's first decode position
        if self.stream is None:
            return self._generate(context, input_ids, input_lengths, start, S, max_new_tokens, sampling)
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)  # the caller's pending work (inputs, weight updates) comes first
        with torch.cuda.stream(self.stream):
            result = self._generate(context, input_ids, input_lengths, start, S, max_new_tokens, sampling)
        caller.wait_stream(self.stream)
        return result

    def _generate(self, context, input_ids, input_lengths, start, S, max_new_tokens, sampling) -> GenerationResult:
        B = input_ids.shape[0]
        st = self._bucket(B, S)
        graph = self._graph(st, sampling) if self.use_graph else None
        self._rng.manual_seed(sampling.seed)

        self._sync()
        t0 = time.perf_counter()
        logits, keys, values = self.backend.prefill(context, input_ids, input_lengths)
        N = keys[0].shape[2]  # the context's and the prompt's lengths, padding included
        for i in range(len(keys)):
            st.k[i, :, :, :N].copy_(keys[i])
            st.v[i, :, :, :N].copy_(values[i])
        first = sample(logits, sampling, self._rng)
        st.out[:, 0] = first
        st.token.copy_(first[:, None])
        st.position.copy_(start)  # real context + real prompt: the slots after it are padding, masked and overwritten
        st.finished.copy_(first == self.end_id)
        st.step.fill_(1)
        self._sync()
        t1 = time.perf_counter()

        steps = 0
        while steps < max_new_tokens - 1:
            graph.replay() if graph is not None else self._decode_step(st, sampling)
            steps += 1
            if steps % self.eos_check_interval == 0 and bool(st.finished.all()):
                break
        self._sync()
        t2 = time.perf_counter()

        tokens = st.out[:, : steps + 1].cpu()
        is_end = tokens == self.end_id
        first_end = torch.where(is_end.any(1), is_end.int().argmax(1) + 1, torch.full((B,), tokens.shape[1]))
        rows = tokens.tolist()
        sequences = [row[: row.index(self.end_id)] if self.end_id in row else row for row in rows]
        texts = [self.tok.decode(row) for row in rows] if self.text else []
        return GenerationResult(tokens=tokens, num_generated=first_end, sequences=sequences, texts=texts,
                                time_to_first_token_s=t1 - t0, decode_time_s=t2 - t1, decode_steps=steps,
                                backend=self.backend.name, capacity=S, cuda_graph=graph is not None)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
