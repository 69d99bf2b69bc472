"""Token sampling that stays on the device: no host synchronisation, fixed shapes, so it can be graph-captured."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from mmgpt.errors import UserError

MIN_TEMPERATURE = 1e-3  # far above where logits / temperature overflow to inf (NaN probabilities); below it, use 0
SEED_MAX = 2**63 - 1


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0

    def __post_init__(self):
        for name, kind in (("temperature", float), ("top_k", int), ("top_p", float), ("seed", int)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
                raise UserError(f"sampling.{name}={value!r} must be {'a number' if kind is float else 'an integer'}")
        if not math.isfinite(self.temperature) or (self.temperature != 0 and not self.temperature >= MIN_TEMPERATURE):
            raise UserError(f"sampling.temperature={self.temperature} must be 0 (greedy) or a finite number >= "
                            f"{MIN_TEMPERATURE}: smaller values overflow the logits into NaN or one token")
        if not 0 <= self.seed <= SEED_MAX:
            raise UserError(f"sampling.seed={self.seed} must lie in [0, 2**63 - 1] (a 64-bit generator seed)")
        if self.top_k < 0:
            raise UserError(f"sampling.top_k={self.top_k} must be >= 0 (0 means off)")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"sampling.top_p={self.top_p} must lie in (0, 1] (1 means off)")

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise UserError(f"unknown sampling options {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sample(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> next tokens (B,) int64."""
    if cfg.greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k > 0:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already cover top_p (the first token always stays)
        drop = (torch.cumsum(probs, dim=-1) - probs) > cfg.top_p
        kept = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, kept)
    probs = torch.softmax(logits, dim=-1)
    # Gumbel-max via exponential noise: argmax(p / E) with E ~ Exp(1) draws from p, without torch.multinomial's sync
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise).argmax(dim=-1)
