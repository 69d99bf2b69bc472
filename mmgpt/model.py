"""The multimodal GPT: a GPT-2 decoder whose input is [modality-1 prefix] + [text tokens].

One file, nanoGPT style. Parameter names match GPT-2 checkpoints (`transformer.wte`, `h.{i}.attn.c_attn`, ...).
The prefix encoder maps raw modality-1 inputs (B, P, F) to P embeddings; learned positions cover the whole
sequence, prefix first. Generation never needs the prefix again after prefill: it lives in the KV cache.

`forward` is the training path (causal SDPA over prefix + text). `forward_cached` is the one inference path that
every exported graph and the PyTorch backend share: a new segment (an optional prefix, then tokens) attends to a
past KV cache of any capacity S (masked by each row's start position) and to itself causally.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from mmgpt.errors import UserError


@dataclass
class GPTConfig:
    vocab_size: int = 259
    block_size: int = 1024  # learned positions: max prefix + text length
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    tie_weights: bool = True
    prefix_dim: int = 16  # F: features per prefix element (a flattened image patch, a CLIP vector, ...)
    prefix_encoder: str = "linear"  # "linear" (patch embedding) | "mlp" (feature projector, LLaVA-style)
    layer_norm_epsilon: float = 1e-5  # of the decoder's LayerNorms (ln_1, ln_2, ln_f), as in a GPT-2 config.json
    activation: str = "gelu_tanh"  # the MLP's GELU: "gelu_tanh" (GPT-2's gelu_new) | "gelu" (exact, erf)

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.prefix_encoder not in ("linear", "mlp"):
            raise UserError(f"prefix_encoder={self.prefix_encoder!r}: choose 'linear' or 'mlp'")
        if self.activation not in ("gelu_tanh", "gelu"):
            raise UserError(f"activation={self.activation!r}: choose 'gelu_tanh' or 'gelu'")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"unknown model config keys {sorted(unknown)}; known keys: {sorted(known)}")
        return cls(**d)


class PrefixEncoder(nn.Module):
    """(B, P, F) raw modality-1 inputs -> (B, P, C) embeddings."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.prefix_encoder == "linear":
            self.proj = nn.Linear(cfg.prefix_dim, cfg.n_embd, bias=cfg.bias)
        else:
            self.proj = nn.Sequential(
                nn.LayerNorm(cfg.prefix_dim),
                nn.Linear(cfg.prefix_dim, cfg.n_embd, bias=cfg.bias),
                nn.GELU(approximate="tanh"),
                nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias),
            )

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        return self.proj(prefix)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_embd = cfg.n_head, cfg.n_embd
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # fused QKV
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout

    def qkv(self, x: torch.Tensor):
        B, N, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        shape = (B, N, self.n_head, C // self.n_head)
        return (t.view(shape).transpose(1, 2) for t in (q, k, v))  # each (B, H, N, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Training: causal attention within the sequence."""
        B, N, C = x.shape
        q, k, v = self.qkv(x)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.c_proj(y.transpose(1, 2).reshape(B, N, C))

    def forward_cached(self, x, past_k, past_v, mask):
        """x (B, N, C) new segment; past_k/v (B, H, S, D) or None; mask (B, 1, [S +] N, ...) bool, True = attend.

        Scores against the past and against the new segment are computed separately and softmaxed together,
        so the cache is read once and never concatenated (a concat would copy all of it every step).
        Returns the output and the new segment's keys and values (B, H, N, D) for the caller to store.
        """
        B, N, C = x.shape
        q, k, v = self.qkv(x)
        scale = 1.0 / math.sqrt(q.shape[-1])
        scores = q @ k.transpose(-2, -1)  # (B, H, N, N)
        if past_k is not None:
            scores = torch.cat([q @ past_k.transpose(-2, -1), scores], dim=-1)  # (B, H, N, S+N)
        scores = (scores * scale).masked_fill(~mask, float("-inf"))
        att = torch.softmax(scores.float(), dim=-1).to(q.dtype)  # fp32 softmax: fp16 exp overflows
        y = att[..., -N:] @ v  # (B, H, N, D)
        if past_k is not None:
            y = y + att[..., :-N] @ past_v
        return self.c_proj(y.transpose(1, 2).reshape(B, N, C)), k, v


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)
        self.approximate = "tanh" if cfg.activation == "gelu_tanh" else "none"

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    def forward_cached(self, x, past_k, past_v, mask):
        a, k, v = self.attn.forward_cached(self.ln_1(x), past_k, past_v, mask)
        x = x + a
        return x + self.mlp(self.ln_2(x)), k, v


class MultimodalGPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.prefix_encoder = PrefixEncoder(cfg)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
            ln_f=nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon, bias=cfg.bias),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        # A training choice, not part of the model (the config is what checkpoints and exports carry): recompute
        # each block in the backward pass instead of keeping its activations.
        self.activation_checkpointing = False
        if cfg.tie_weights:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def embed(self, prefix: torch.Tensor | None, input_ids: torch.Tensor, start_pos: torch.Tensor) -> torch.Tensor:
        """[prefix] + tokens -> (B, P+T, C) with learned positions start_pos[b] + 0, 1, ..."""
        x = self.transformer.wte(input_ids)  # (B, T, C)
        if prefix is not None:
            x = torch.cat([self.prefix_encoder(prefix).to(x.dtype), x], dim=1)  # (B, P+T, C)
        N = x.shape[1]
        pos = start_pos[:, None] + torch.arange(N, device=x.device)  # (B, N)
        return self.transformer.drop(x + self.transformer.wpe(pos))

    def forward(self, prefix: torch.Tensor, input_ids: torch.Tensor, targets: torch.Tensor | None = None):
        """Training forward. Returns logits over the text positions (B, T, V) and, given targets (B, T) with
        -100 where no loss is taken, the mean cross-entropy over text tokens only."""
        B, P = prefix.shape[:2]
        x = self.embed(prefix, input_ids, torch.zeros(B, dtype=torch.long, device=input_ids.device))
        recompute = self.activation_checkpointing and self.training
        for block in self.transformer.h:
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        logits = self.lm_head(self.transformer.ln_f(x[:, P:]))  # (B, T, V): the prefix has no targets
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss

    def forward_cached(self, prefix, input_ids, input_lengths, start_pos, past_keys, past_values):
        """The inference step shared by prefill, decode and every backend.

        prefix (B, P, F) or None; input_ids (B, T) right-padded; input_lengths (B,) real tokens per row;
        start_pos (B,) position of the segment's first element; past_keys/values: one (B, H, S, D) per layer,
        slot j valid for row b iff j < start_pos[b] (S may be 0), or None for a prefill with no past.
        Returns logits (B, V) at each row's last real token, and per layer the new segment's keys and values
        (B, H, P+T, D).
        """
        x = self.embed(prefix, input_ids, start_pos)
        B, N, _ = x.shape
        P = N - input_ids.shape[1]
        mask = torch.ones(N, N, dtype=torch.bool, device=x.device).tril()[None, None].expand(B, 1, N, N)
        if past_keys is None:  # prefill: no past inputs at all, so the graph has no zero-size tensors
            past_keys = past_values = [None] * len(self.transformer.h)
        else:
            slots = torch.arange(past_keys[0].shape[2], device=x.device)
            past_ok = (slots[None, :] < start_pos[:, None])[:, None, None, :]  # (B, 1, 1, S)
            mask = torch.cat([past_ok.expand(B, 1, N, slots.shape[0]), mask], dim=-1)  # (B, 1, N, S+N)
        new_keys, new_values = [], []
        for block, pk, pv in zip(self.transformer.h, past_keys, past_values):
            x, k, v = block.forward_cached(x, pk, pv, mask)
            new_keys.append(k)
            new_values.append(v)
        last = (P + input_lengths - 1)[:, None, None].expand(B, 1, x.shape[-1])  # (B, 1, C)
        h = self.transformer.ln_f(torch.gather(x, 1, last)[:, 0])  # (B, C): only the rows' last real tokens
        return self.lm_head(h), new_keys, new_values
