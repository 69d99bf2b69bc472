"""Token sampling that stays on the device: no host synchronisation, fixed shapes, so it can be graph-captured."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

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
    """logits (B, V) -> next tokens (B,) int64, one setting for every row, noise from `generator`."""
    if cfg.greedy:
        return logits.argmax(dim=-1)
    rows = RowSampling.of([cfg] * logits.shape[0], logits.device)
    noise = torch.empty(logits.shape, dtype=torch.float32, device=logits.device).exponential_(1.0, generator=generator)
    return sample_rows(logits, rows, noise)


@dataclass
class RowSampling:
    """Per-row sampling settings as device tensors (B,), so that one captured step serves rows with mixed settings."""
    temperature: torch.Tensor  # float32, 0 = greedy
    top_k: torch.Tensor  # int64, 0 = off
    top_p: torch.Tensor  # float32, 1 = off
    seed: torch.Tensor  # int64, the row's seed folded to 62 bits (see row_noise)

    @classmethod
    def of(cls, configs: list[SamplingConfig], device) -> "RowSampling":
        return cls(torch.tensor([c.temperature for c in configs], dtype=torch.float32, device=device),
                   torch.tensor([c.top_k for c in configs], dtype=torch.long, device=device),
                   torch.tensor([c.top_p for c in configs], dtype=torch.float32, device=device),
                   torch.tensor([fold_seed(c.seed) for c in configs], dtype=torch.long, device=device))

    @classmethod
    def empty(cls, rows: int, device) -> "RowSampling":
        return cls.of([SamplingConfig()] * rows, device)

    def head(self, n: int) -> "RowSampling":
        """The first n rows' settings, as views."""
        return RowSampling(self.temperature[:n], self.top_k[:n], self.top_p[:n], self.seed[:n])

    def copy_(self, other: "RowSampling") -> None:
        """Every row's settings from `other` (same rows, any device), in place."""
        for f in fields(self):
            getattr(self, f.name).copy_(getattr(other, f.name))

    def write(self, rows: torch.Tensor, other: "RowSampling") -> None:
        """Set the given rows (J,) to `other`'s (J,) settings, in place (a captured step keeps the addresses)."""
        for f in fields(self):
            getattr(self, f.name).index_copy_(0, rows, getattr(other, f.name))


def sample_rows(logits: torch.Tensor, rows: RowSampling, noise: torch.Tensor) -> torch.Tensor:
    """logits (B, V), per-row settings, Exp(1) noise (B, V) -> next tokens (B,). Greedy rows take the argmax of the
    raw logits, so they are bit-equal to greedy decoding alone whatever the other rows do."""
    greedy = logits.argmax(dim=-1)
    temperature = torch.where(rows.temperature > 0, rows.temperature, 1.0)[:, None]
    scaled = logits.float() / temperature
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
    V = logits.shape[-1]
    k = torch.where(rows.top_k > 0, rows.top_k.clamp(max=V), V)[:, None]  # (B, 1)
    kth = sorted_logits.gather(1, k - 1)  # ties with the k-th value stay, as torch.topk's threshold would keep them
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    # drop a token when the tokens ranked above it already cover top_p (the first token always stays)
    drop = (torch.cumsum(probs, dim=-1) - probs) > rows.top_p[:, None]
    kept = sorted_logits.masked_fill(drop, float("-inf"))
    filtered = torch.full_like(scaled, float("-inf")).scatter(1, order, kept)
    # Gumbel-max via exponential noise: argmax(p / E) with E ~ Exp(1) draws from p, without torch.multinomial's sync
    drawn = (torch.softmax(filtered, dim=-1) / noise).argmax(dim=-1)
    return torch.where(rows.temperature > 0, drawn, greedy)


MASK32 = 0xFFFFFFFF


def fold_seed(seed: int) -> int:
    """A 64-bit seed -> 32 bits that still depend on all 64 (the hash below works on 32-bit words)."""
    return _mix32((seed & MASK32) ^ _mix32(seed >> 32))


def _mix32(x):
    """lowbias32 (Wellons' integer hash) of 32-bit words, as Python ints or int64 tensors (where products wrap and
    are masked back to 32 bits, which keeps the low bits exact)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def row_noise(seed: torch.Tensor, counter: torch.Tensor, vocab: int) -> torch.Tensor:
    """Exp(1) noise (B, V) that is a pure function of (row seed, the row's token index, vocabulary index): a seeded
    request draws the same tokens whichever rows it shares a batch with and whenever it joined, with no generator
    state to carry between steps."""
    row = _mix32(seed ^ _mix32(counter + 0x9E3779B9))[:, None]  # (B, 1)
    bits = _mix32(row ^ torch.arange(vocab, device=seed.device, dtype=torch.long)[None, :])  # (B, V)
    uniform = ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))  # 24 bits, strictly inside (0, 1)
    return -torch.log(uniform)
