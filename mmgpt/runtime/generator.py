"""Static batches on the in-flight engine: a batch joins an engine of exactly its rows at once (one prefill), then
the engine's captured decode step runs until every row is done. One engine (and one CUDA graph) per (batch,
cache-capacity) bucket.

gpt-fast style: the KV cache is a static (L, B, H, S, D) buffer written in place at each row's position; every
decode step touches only device tensors (mmgpt/runtime/inflight.py). The host looks at the tokens every
`eos_check_interval` steps, never per token. Without a GPU the same step runs un-captured.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from mmgpt.errors import UserError
from mmgpt.model import TEXT
from mmgpt.runtime.inflight import InflightEngine, Request
from mmgpt.runtime.requests import capacity_for, check_context, check_token_ids, special_ids
from mmgpt.runtime.sampling import SEED_MAX, SamplingConfig

DEFAULT_BUCKETS = (64, 128, 256, 512, 1024)


@dataclass
class GenerationResult:
    tokens: torch.Tensor  # (B, n) generated ids, end-padded after a row finished (CPU)
    num_generated: torch.Tensor  # (B,) tokens up to and including the first end token
    sequences: list[list[int]]  # each row's generated ids before its end token
    texts: list[str]  # each row decoded by the tokenizer where the decoded modality is text, else empty
    time_to_first_token_s: float
    decode_time_s: float
    decode_steps: int  # steps after the first token: one step = B tokens
    backend: str
    capacity: int
    cuda_graph: bool

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second over the decode steps (all rows counted, batch included)."""
        return self.decode_steps * self.tokens.shape[0] / self.decode_time_s if self.decode_time_s > 0 else 0.0


class Generator:
    def __init__(self, backend, tokenizer, capacity_buckets=DEFAULT_BUCKETS,
                 max_positions: int | None = None, cuda_graph: bool | None = None, eos_check_interval: int = 8):
        self.backend, self.tok = backend, tokenizer
        self.start_id, self.end_id, _ = special_ids(backend.dims, tokenizer)
        self.device = torch.device(backend.device)
        limit = max_positions or max(capacity_buckets)
        self.buckets = sorted({min(int(s), limit) for s in capacity_buckets})
        self.use_graph = (self.device.type == "cuda") if cuda_graph is None else cuda_graph
        if self.use_graph and self.device.type != "cuda":
            raise UserError("cuda_graph=True needs a CUDA backend device")
        self.eos_check_interval = eos_check_interval
        self._engines: dict[tuple[int, int], InflightEngine] = {}

    @property
    def graph_captures(self) -> int:
        """How many CUDA graphs were captured over this generator's life."""
        return sum(e.graph_captures for e in self._engines.values())

    # ---------------------------------------------------------------- inputs
    def prepare(self, prompts: list[list[int]] | None, batch: int) -> list[list[int]]:
        """Checked prompts of the decoded modality, one per row. Default: its start token ([BOS] for text, the end
        token for another modality)."""
        prompts = prompts or [[self.start_id]] * batch
        if len(prompts) != batch:
            raise UserError(f"{len(prompts)} prompts for a context batch of {batch}; give one prompt per row")
        if any(len(p) == 0 for p in prompts):
            raise UserError("empty prompt: every row needs at least one token (the BOS token is the usual start)")
        return check_token_ids(prompts, self.backend.dims.vocab_size)


    def _engine(self, B: int, S: int) -> InflightEngine:
        """One engine per (batch, capacity) bucket; its rows start together, so every step runs them all."""
        if (B, S) not in self._engines:
            self._engines[B, S] = InflightEngine(self.backend, self.tok, rows=B, capacity=S,
                                                 cuda_graph=self.use_graph, stream_interval=self.eos_check_interval,
                                                 row_buckets=False)
        return self._engines[B, S]

    # ---------------------------------------------------------------- generate
    @torch.inference_mode()
    def generate(self, context, prompts: list[list[int]] | None = None, max_new_tokens: int = 32,
                 sampling: SamplingConfig = SamplingConfig()) -> GenerationResult:
        """Every row of the batch decoded to its end token or max_new_tokens. Row b samples with seed
        sampling.seed + b, so equal rows of one batch still draw independently.

        context: modality -> features (B, P, F), or token lists (or (ids, lengths)) of a discrete modality; a bare
        (B, P, F) tensor for a model whose context is one continuous modality."""
        context, B, context_len = check_context(self.backend, context)
        prompts = self.prepare(prompts, B)
        S = capacity_for(self.backend, B, int(context_len.max()), max(map(len, prompts)), max_new_tokens,
                         self.buckets)
        engine = self._engine(B, S)
        states = [engine.submit(Request({name: value[b] for name, value in context.items()}, prompts[b],
                                        max_new_tokens, replace(sampling, seed=(sampling.seed + b) % (SEED_MAX + 1))))
                  for b in range(B)]
        self._sync()
        t0 = time.perf_counter()
        engine.step(max_steps=0)  # all rows join: one prefill and the first tokens
        self._sync()
        t1 = time.perf_counter()
        steps = 0
        while engine.has_work():
            n = min(self.eos_check_interval, max_new_tokens - 1 - steps)
            engine.step(max_steps=n)
            steps += n
        self._sync()
        t2 = time.perf_counter()

        tokens = torch.full((B, steps + 1), self.end_id, dtype=torch.long)
        for b, state in enumerate(states):
            tokens[b, : len(state.tokens)] = torch.tensor(state.tokens)
        sequences = [[t for t in s.tokens if t != self.end_id] for s in states]  # the end token is always last
        texts = [self.tok.decode(s.tokens) for s in states] if self.backend.dims.decoded.name == TEXT else []
        return GenerationResult(tokens=tokens, num_generated=torch.tensor([len(s.tokens) for s in states]),
                                sequences=sequences, texts=texts, time_to_first_token_s=t1 - t0,
                                decode_time_s=t2 - t1,
                                decode_steps=steps, backend=self.backend.name, capacity=S,
                                cuda_graph=bool(engine.graphs))

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
