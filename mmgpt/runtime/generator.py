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

from mmgpt.runtime.sampling import SamplingConfig, sample
from mmgpt.errors import UserError

DEFAULT_BUCKETS = (64, 128, 256, 512, 1024)


def check_prefix(prefix, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A (B, P, F) float tensor with B, F >= 1 (P = 0: a text-only prompt), finite in `dtype`, the dtype the
    backend runs (a value that fits float32 may overflow float16)."""
    if not torch.is_tensor(prefix) or prefix.ndim != 3 or prefix.shape[0] < 1 or prefix.shape[2] < 1:
        raise UserError(f"prefix must be a (B, P, F) tensor with B >= 1 and F >= 1, got shape "
                        f"{tuple(getattr(prefix, 'shape', ()))}")
    if not prefix.is_floating_point():
        raise UserError(f"prefix must be a float tensor, got {prefix.dtype}")
    if dtype is not None and not bool(torch.isfinite(prefix.to(dtype)).all()):
        raise UserError(f"prefix holds NaN or infinite values in the model's dtype {str(dtype).removeprefix('torch.')}"
                        f" (the largest float16 is {torch.finfo(torch.float16).max:.0f}); scale or clean the features")
    return prefix


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
            raise UserError(f"{what} {b} holds token id(s) {bad[:5]} that are not integers in the vocabulary "
                            f"[0, {vocab_size}); encode prompts with the artifacts' tokenizer")
        out.append(ids)
    return out


@dataclass
class GenerationResult:
    tokens: torch.Tensor  # (B, n) generated ids, EOS-padded after a row finished (CPU)
    num_generated: torch.Tensor  # (B,) tokens up to and including the first EOS
    texts: list[str]
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
    def prepare(self, prompts: list[list[int]] | None, batch: int):
        """Right-pad token prompts -> input_ids (B, T), input_lengths (B,). Default prompt: [BOS]."""
        prompts = prompts or [[self.tok.bos_id]] * batch
        if len(prompts) != batch:
            raise UserError(f"{len(prompts)} prompts for a prefix batch of {batch}; give one prompt per prefix")
        if any(len(p) == 0 for p in prompts):
            raise UserError("empty prompt: every row needs at least one token (the BOS token is the usual start)")
        prompts = check_token_ids(prompts, self.backend.dims.vocab_size)
        T = max(len(p) for p in prompts)
        ids = torch.full((batch, T), self.tok.pad_id, dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = torch.tensor(p, dtype=torch.long)
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
        return ids.to(self.device), lengths.to(self.device)

    def capacity_for(self, prefix: torch.Tensor, prompt_len: int, max_new_tokens: int) -> int:
        """Validate shapes before anything runs; returns the capacity bucket to use."""
        be = self.backend
        check_prefix(prefix, be.dtype)
        B, P, F = prefix.shape
        if F != be.dims.prefix_dim:
            raise UserError(f"prefix feature size F={F}, but the model expects F={be.dims.prefix_dim}")
        if be.prefix_len is not None and P != be.prefix_len:
            raise UserError(f"prefix length P={P}, but the exported graphs expect P={be.prefix_len}")
        if be.max_batch is not None and B > be.max_batch:
            raise UserError(f"batch {B} exceeds the {be.name} backend's max batch {be.max_batch}; split the "
                             "batch (infer.py does) or, for engines, rebuild with a larger engine.profiles.batch")
        if max_new_tokens < 1:
            raise UserError(f"max_new_tokens={max_new_tokens} must be >= 1")
        need = P + prompt_len + max_new_tokens
        for s in self.buckets:
            if need <= s:
                return s
        raise UserError(f"prefix ({P}) + prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) = {need} "
                         f"exceeds the largest cache capacity {self.buckets[-1]}; lower max_new_tokens to "
                         f"{self.buckets[-1] - P - prompt_len} or less")

    # ---------------------------------------------------------------- buffers and graphs
    def _bucket(self, B: int, S: int) -> _Bucket:
        key = (B, S)
        if key not in self._state:
            be, dev = self.backend, self.device
            shape = (be.dims.n_layer, B, be.dims.n_kv_head, S, be.dims.head_dim)
            self._state[key] = _Bucket(
                k=torch.zeros(shape, dtype=be.dtype, device=dev), v=torch.zeros(shape, dtype=be.dtype, device=dev),
                token=torch.zeros(B, 1, dtype=torch.long, device=dev),
                position=torch.zeros(B, 1, dtype=torch.long, device=dev),
                finished=torch.zeros(B, dtype=torch.bool, device=dev),
                out=torch.full((B, S), self.tok.eos_id, dtype=torch.long, device=dev),
                step=torch.zeros(1, dtype=torch.long, device=dev))
        return self._state[key]

    def _decode_step(self, st: _Bucket, sampling: SamplingConfig) -> None:
        """One token for every row, device-only: execute + KV write, sample, record, advance."""
        logits = self.backend.decode(st.token, st.position, st.k, st.v)
        nxt = sample(logits, sampling, self._rng)
        nxt = torch.where(st.finished, torch.full_like(nxt, self.tok.eos_id), nxt)  # finished rows emit EOS
        st.out.scatter_(1, st.step.expand(nxt.shape[0], 1), nxt[:, None])
        st.finished.logical_or_(nxt == self.tok.eos_id)
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
    def generate(self, prefix: torch.Tensor, prompts: list[list[int]] | None = None, max_new_tokens: int = 32,
                 sampling: SamplingConfig = SamplingConfig()) -> GenerationResult:
        B = check_prefix(prefix).shape[0]
        input_ids, input_lengths = self.prepare(prompts, B)
        S = self.capacity_for(prefix, input_ids.shape[1], max_new_tokens)
        if self.stream is None:
            return self._generate(prefix.to(self.device), input_ids, input_lengths, S, max_new_tokens, sampling)
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)  # the caller's pending work (inputs, weight updates) comes first
        with torch.cuda.stream(self.stream):
            result = self._generate(prefix.to(self.device), input_ids, input_lengths, S, max_new_tokens, sampling)
        caller.wait_stream(self.stream)
        return result

    def _generate(self, prefix, input_ids, input_lengths, S, max_new_tokens, sampling) -> GenerationResult:
        B = prefix.shape[0]
        st = self._bucket(B, S)
        graph = self._graph(st, sampling) if self.use_graph else None
        self._rng.manual_seed(sampling.seed)

        self._sync()
        t0 = time.perf_counter()
        logits, keys, values = self.backend.prefill(prefix, input_ids, input_lengths)
        N = keys[0].shape[2]  # P + T
        for i in range(len(keys)):
            st.k[i, :, :, :N].copy_(keys[i])
            st.v[i, :, :, :N].copy_(values[i])
        first = sample(logits, sampling, self._rng)
        st.out[:, 0] = first
        st.token.copy_(first[:, None])
        st.position.copy_((N - input_ids.shape[1] + input_lengths)[:, None])  # P + real prompt length
        st.finished.copy_(first == self.tok.eos_id)
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
        is_eos = tokens == self.tok.eos_id
        first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full((B,), tokens.shape[1]))
        texts = [self.tok.decode(row) for row in tokens.tolist()]
        return GenerationResult(tokens=tokens, num_generated=first_eos, texts=texts, time_to_first_token_s=t1 - t0,
                                decode_time_s=t2 - t1, decode_steps=steps, backend=self.backend.name, capacity=S,
                                cuda_graph=graph is not None)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
