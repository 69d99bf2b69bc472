"""The multimodal GPT: a decoder over a sequence of modalities, each with its own way in and out.

One file, nanoGPT style, two families of decoder chosen by `GPTConfig.family`:
- gpt2: pre-LayerNorm, learned positions, GELU MLP; parameter names match GPT-2 checkpoints (`transformer.wte`,
  `transformer.h.{i}.attn.c_attn`, ...);
- llama: RMSNorm, rotary positions (RoPE, optionally Llama 3's frequency scaling), SwiGLU MLP, grouped-query
  attention (n_kv_head <= n_head), optional q/k/v biases (Qwen2); parameter names match Hugging Face's Llama
  (`model.embed_tokens`, `model.layers.{i}.self_attn.q_proj`, ...), so its checkpoints load with no renaming.
A *continuous* modality enters through its encoder (`encoders.<name>`) from features (B, P, F); a *discrete* one
through its own embedding table from ids (B, T) with per-row lengths: the modality named `text` uses the language
model's token table (and `lm_head`), any other its own `embeddings.<name>` (and `heads.<name>`). The context is the
configured modalities in order; the *decoded* modality's prompt follows it. Each row's real context positions are
packed to the front (positions 0..n-1), so a ragged context costs nothing after prefill: it lives in the KV cache.

`forward` is the training path (causal SDPA, a weighted loss per modality with a head). `forward_cached` is the one
inference path that every exported graph and the PyTorch backend share: a new segment (an optional context, then
tokens of the decoded modality) attends to a past KV cache of any capacity S (masked by each row's start position)
and to itself causally.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from mmgpt.errors import UserError


TEXT = "text"  # the discrete modality whose tables are the language model's own: its token table in, lm_head out
FAMILIES = ("gpt2", "llama")
KINDS = ("continuous", "discrete")
ENCODERS = ("linear", "mlp")
MODALITY_TABLES = ("encoders.", "embeddings.", "heads.")  # parameter prefixes of the modalities' own tables
RESERVED = ("input", "position", "prompt", "cache", "batch", "past", "present", "logits")


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3's RoPE frequency scaling (rope_type "llama3"): long wavelengths are divided by `factor`, short
    ones kept, the band between interpolated."""
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self):
        if not (self.factor > 0 and 0 < self.low_freq_factor < self.high_freq_factor
                and self.original_max_position_embeddings > 0):
            raise UserError(f"rope_scaling={self!r}: needs factor > 0, 0 < low_freq_factor < high_freq_factor and "
                            "original_max_position_embeddings > 0")

    @classmethod
    def from_dict(cls, d) -> "RopeScaling":
        d = {k: v for k, v in dict(d).items() if k not in ("rope_type", "type")}
        known = {f.name for f in fields(cls)}
        if set(d) != known:
            raise UserError(f"rope_scaling: needs exactly the keys {sorted(known)} (Llama 3 scaling), got "
                            f"{sorted(d)}")
        return cls(**d)


def rope_inv_freq(cfg: "GPTConfig", device) -> torch.Tensor:
    """(D/2,) fp32 inverse frequencies, as Hugging Face computes them (llama3 type when rope_scaling is set).
    Computed on the device inside the graph: a few tiny ops, constant-folded by every exporter."""
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64, device=device).float() / D))
    r = cfg.rope_scaling
    if r is None:
        return inv_freq
    low_wavelen = r.original_max_position_embeddings / r.low_freq_factor
    high_wavelen = r.original_max_position_embeddings / r.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / r.factor, inv_freq)
    smooth = (r.original_max_position_embeddings / wavelen - r.low_freq_factor) / (r.high_freq_factor
                                                                                    - r.low_freq_factor)
    smoothed = (1 - smooth) * scaled / r.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rotate(x: torch.Tensor, rope) -> torch.Tensor:
    """RoPE on x (B, H, N, D) with rope = (cos, sin), each (B, N, D): Hugging Face's rotate-half convention."""
    cos, sin = (t[:, None] for t in rope)  # (B, 1, N, D)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def cached_attention(q, k, v, past_k, past_v, mask):
    """Attention of a new segment to a past cache and to itself, grouped-query aware.

    q (B, H, N, D); k/v (B, H_kv, N, D); past_k/v (B, H_kv, S, D) or None; mask (B, 1, N, S + N) bool, True =
    attend, or None without a past. Scores against the past and against the new segment are computed separately
    and softmaxed together, so the cache is read once and never concatenated (a concat would copy all of it every
    step); the H / H_kv query heads of a group are stacked along N, so each key/value head is read once per group.
    Without a past (a prefill) attention is causal, so causal SDPA computes it with a fused (flash) kernel instead
    of materialising the scores: half of a 576-patch prefill's time on an H200 (NOTES.md).
    Returns (B, H, N, D).
    """
    B, H, N, D = q.shape
    G = H // k.shape[1]
    if past_k is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=G > 1)
    q = q.reshape(B, k.shape[1], G * N, D)  # (B, H_kv, G*N, D)
    scale = 1.0 / math.sqrt(D)
    scores = torch.cat([q @ past_k.transpose(-2, -1), q @ k.transpose(-2, -1)], dim=-1)  # (B, H_kv, G*N, S+N)
    scores = scores.unflatten(2, (G, N))  # (B, H_kv, G, N, S+N)
    scores = (scores * scale).masked_fill(~mask[:, :, None], float("-inf"))
    att = torch.softmax(scores.float(), dim=-1).to(q.dtype).flatten(2, 3)  # fp32 softmax: fp16 exp overflows
    y = att[..., -N:] @ v + att[..., :-N] @ past_v  # (B, H_kv, G*N, D)
    return y.reshape(B, H, N, D)


@dataclass(frozen=True)
class Modality:
    """One modality of the sequence. The data fills what it determines (dim, vocab_size, end_id) where unset."""
    name: str
    kind: str  # continuous: features (B, P, dim) through `encoder`; discrete: ids (B, T) through its own table
    dim: int | None = None  # continuous: features per element
    encoder: str = "linear"  # continuous: "linear" (patch embedding) | "mlp" (LLaVA-style projector)
    vocab_size: int | None = None  # discrete: rows of its embedding (and head); text: the model's vocab_size
    end_id: int | None = None  # discrete, non-text: ends a sequence and starts a decoded one (text: its tokenizer's)
    head: bool = False  # discrete: predicts its own next token (the decoded modality always has one)
    loss_weight: float = 1.0  # of its cross-entropy in the training loss, where it has a head

    def check(self) -> None:
        where = f"model.modalities[{self.name}]"
        if not self.name.isidentifier() or self.name in RESERVED:
            raise UserError(f"{where}: the name must be an identifier (letters, digits, _) other than "
                            f"{', '.join(RESERVED)} (the graphs' own input names), got {self.name!r}")
        if self.kind not in KINDS:
            raise UserError(f"{where}.kind={self.kind!r}: choose one of {KINDS}")
        if self.kind == "continuous":
            if self.dim is None or self.dim < 1:
                raise UserError(f"{where}.dim={self.dim}: a continuous modality needs >= 1 features per element "
                                "(the data sets it: leave it unset)")
            if self.encoder not in ENCODERS:
                raise UserError(f"{where}.encoder={self.encoder!r}: choose 'linear' or 'mlp'")
            if self.head:
                raise UserError(f"{where}: a continuous modality has no vocabulary to predict: set head=false")
            return
        if self.vocab_size is None or self.vocab_size < 1:
            raise UserError(f"{where}.vocab_size={self.vocab_size}: a discrete modality needs a vocabulary of at "
                            "least one token (the data sets it: leave it unset)")
        if self.end_id is not None and not 0 <= self.end_id < self.vocab_size:
            raise UserError(f"{where}.end_id={self.end_id} lies outside its vocabulary [0, {self.vocab_size})")
        if self.name != TEXT and self.head and self.end_id is None:
            raise UserError(f"{where}: a modality with a head needs an end_id (the token that ends its sequences)")
        if not self.loss_weight >= 0:
            raise UserError(f"{where}.loss_weight={self.loss_weight} must be >= 0")


def image_to_text(dim: int = 16, encoder: str = "linear") -> dict:
    """The digits captioning model's modalities (features of an image in, text out) as GPTConfig fields."""
    return {"modalities": [Modality("image", "continuous", dim=dim, encoder=encoder), Modality(TEXT, "discrete",
                                                                                               head=True)],
            "context": ["image"], "decoded": TEXT}


@dataclass
class GPTConfig:
    vocab_size: int = 259  # of the text modality's tables, the token table and lm_head
    block_size: int = 1024  # learned positions: max context + decoded length
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    tie_weights: bool = True
    layer_norm_epsilon: float = 1e-5  # of the decoder's LayerNorms (ln_1, ln_2, ln_f), as in a GPT-2 config.json
    activation: str = "gelu_tanh"  # gpt2's MLP GELU: "gelu_tanh" (GPT-2's gelu_new) | "gelu" (exact, erf)
    family: str = "gpt2"  # "gpt2" | "llama" (RMSNorm, RoPE, SwiGLU, GQA; also Qwen2 and SmolLM2)
    n_kv_head: int | None = None  # key/value heads (grouped-query attention); None: n_head. gpt2: n_head
    intermediate_size: int | None = None  # the MLP's hidden width; None: 4 * n_embd (gpt2 only)
    rope_theta: float = 10000.0  # llama: RoPE base
    rope_scaling: RopeScaling | None = None  # llama: Llama 3's frequency scaling, or None
    qkv_bias: bool = False  # llama: biases on q/k/v (Qwen2); gpt2's biases are `bias`
    modalities: list[Modality] = field(default_factory=lambda: image_to_text()["modalities"])
    context: list[str] = field(default_factory=lambda: ["image"])  # the context's modalities, in sequence order
    decoded: str = TEXT  # the discrete modality generated after the context, through its own head

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise UserError(f"family={self.family!r}: choose one of {FAMILIES}")
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling.from_dict(self.rope_scaling)
        if self.family == "gpt2":
            gpt2 = {"n_kv_head": self.n_head, "intermediate_size": 4 * self.n_embd, "rope_scaling": None,
                    "qkv_bias": False}
            self.intermediate_size = self.intermediate_size or gpt2["intermediate_size"]
            wrong = [f"{k}={getattr(self, k)!r}" for k, v in gpt2.items() if getattr(self, k) != v]
            if wrong:
                raise UserError(f"{', '.join(wrong)}: GPT-2 has n_kv_head = n_head, a 4 * n_embd MLP, learned "
                                "positions and `bias` for every bias; set family=llama for these")
        else:
            if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
                raise UserError(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head} (each key/value "
                                "head serves a group of query heads)")
            if self.intermediate_size is None or self.intermediate_size < 1:
                raise UserError(f"intermediate_size={self.intermediate_size}: a llama model needs its MLP width "
                                "(the config.json's intermediate_size)")
            if self.head_dim % 2:
                raise UserError(f"head_dim={self.head_dim} (n_embd / n_head) must be even: RoPE rotates pairs")
            if not self.rope_theta > 0:
                raise UserError(f"rope_theta={self.rope_theta} must be > 0")
        if self.activation not in ("gelu_tanh", "gelu"):
            raise UserError(f"activation={self.activation!r}: choose 'gelu_tanh' or 'gelu'")
        self.modalities = [m if isinstance(m, Modality) else modality_from_dict(m) for m in self.modalities]
        self.context = list(self.context)
        names = [m.name for m in self.modalities]
        if len(set(names)) != len(names):
            raise UserError(f"model.modalities: each name once, got {names}")
        text = next((m for m in self.modalities if m.name == TEXT), None)
        if text is not None:
            if text.kind != "discrete":
                raise UserError("model.modalities[text] is the language model's token modality: kind must be discrete")
            if text.vocab_size not in (None, self.vocab_size):
                raise UserError(f"model.modalities[text].vocab_size={text.vocab_size}, but the text tables have "
                                f"vocab_size={self.vocab_size}: leave it unset")
            self.modalities[names.index(TEXT)] = replace(text, vocab_size=self.vocab_size)
        for m in self.modalities:
            m.check()
        unknown = [n for n in [*self.context, self.decoded] if n not in names]
        if unknown:
            raise UserError(f"model.context / model.decoded name {unknown}, which model.modalities does not "
                            f"declare (it has {names})")
        if len(set(self.context)) != len(self.context):
            raise UserError(f"model.context={self.context}: each modality at most once")
        decoded = self.modality(self.decoded)
        if decoded.kind != "discrete":
            raise UserError(f"model.decoded={self.decoded} is a continuous modality: only a discrete one (token ids "
                            "with its own vocabulary and head) can be generated")
        if not decoded.head:
            self.modalities[names.index(self.decoded)] = replace(decoded, head=True)

    def modality(self, name: str) -> Modality:
        return next(m for m in self.modalities if m.name == name)

    @property
    def context_modalities(self) -> list[Modality]:
        return [self.modality(n) for n in self.context]

    @property
    def decoded_modality(self) -> Modality:
        return self.modality(self.decoded)

    @property
    def ragged_context(self) -> bool:
        """A discrete context has per-row lengths: its real positions are packed to the front of each row."""
        return any(m.kind == "discrete" for m in self.context_modalities)

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
            legacy = " (prefix_dim / prefix_encoder: a model written before modalities; re-train it)" \
                if unknown & {"prefix_dim", "prefix_encoder"} else ""
            raise UserError(f"unknown model config keys {sorted(unknown)}; known keys: {sorted(known)}{legacy}")
        return cls(**d)


def modality_from_dict(d) -> Modality:
    if not isinstance(d, dict) or "name" not in d or "kind" not in d:
        raise UserError(f"model.modalities: each entry needs at least a name and a kind, got {d!r}")
    known = {f.name for f in fields(Modality)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise UserError(f"model.modalities[{d['name']}]: unknown keys {unknown}; known keys: {sorted(known)}")
    return Modality(**d)


class ModalityEncoder(nn.Module):
    """(B, P, F) features of a continuous modality -> (B, P, C) embeddings."""

    def __init__(self, m: Modality, cfg: GPTConfig):
        super().__init__()
        if m.encoder == "linear":
            self.proj = nn.Linear(m.dim, cfg.n_embd, bias=cfg.bias)
        else:
            self.proj = nn.Sequential(
                nn.LayerNorm(m.dim),
                nn.Linear(m.dim, cfg.n_embd, bias=cfg.bias),
                nn.GELU(approximate="tanh"),
                nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias),
            )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features)


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
        """x (B, N, C) new segment; past_k/v (B, H, S, D) or None; mask (B, 1, N, S + N) bool, True = attend, or
        None with no past (causal).

        Returns the output and the new segment's keys and values (B, H, N, D) for the caller to store.
        """
        B, N, C = x.shape
        q, k, v = self.qkv(x)
        y = cached_attention(q, k, v, past_k, past_v, mask)
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

    def forward(self, x, rope=None):
        """rope: unused, GPT-2's positions were added to the input."""
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    def forward_cached(self, x, past_k, past_v, mask, rope=None):
        a, k, v = self.attn.forward_cached(self.ln_1(x), past_k, past_v, mask)
        x = x + a
        return x + self.mlp(self.ln_2(x)), k, v


# ---------------------------------------------------------------- the Llama family
class RMSNorm(nn.Module):
    """Hugging Face's LlamaRMSNorm: normalised in fp32 (an fp16 square overflows), scaled in the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)
        self.dropout = cfg.dropout

    def qkv(self, x, rope):
        """q (B, H, N, D), k and v (B, H_kv, N, D); q and k rotated to their positions."""
        B, N, _ = x.shape
        q = self.q_proj(x).view(B, N, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, N, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, N, self.n_kv_head, self.head_dim).transpose(1, 2)
        return rotate(q, rope), rotate(k, rope), v

    def forward(self, x, rope):
        B, N, _ = x.shape
        q, k, v = self.qkv(x, rope)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=self.n_kv_head != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, N, -1))

    def forward_cached(self, x, past_k, past_v, mask, rope):
        """As CausalSelfAttention.forward_cached, with H_kv key/value heads; the cache holds rotated keys."""
        B, N, _ = x.shape
        q, k, v = self.qkv(x, rope)
        y = cached_attention(q, k, v, past_k, past_v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, N, -1)), k, v


class SwiGLU(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.layer_norm_epsilon)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.layer_norm_epsilon)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, rope):
        x = x + self.self_attn(self.input_layernorm(x), rope)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_cached(self, x, past_k, past_v, mask, rope):
        a, k, v = self.self_attn.forward_cached(self.input_layernorm(x), past_k, past_v, mask, rope)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), k, v


class MultimodalGPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.encoders = nn.ModuleDict({m.name: ModalityEncoder(m, cfg) for m in cfg.modalities
                                       if m.kind == "continuous"})
        own = [m for m in cfg.modalities if m.kind == "discrete" and m.name != TEXT]
        self.embeddings = nn.ModuleDict({m.name: nn.Embedding(m.vocab_size, cfg.n_embd) for m in own})
        self.heads = nn.ModuleDict({m.name: nn.Linear(cfg.n_embd, m.vocab_size, bias=False) for m in own if m.head})
        if cfg.family == "gpt2":
            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
                ln_f=nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon, bias=cfg.bias),
            ))
        else:
            self.model = nn.ModuleDict(dict(
                embed_tokens=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                layers=nn.ModuleList([LlamaBlock(cfg) for _ in range(cfg.n_layer)]),
                norm=RMSNorm(cfg.n_embd, cfg.layer_norm_epsilon),
            ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        # A training choice, not part of the model (the config is what checkpoints and exports carry): recompute
        # each block in the backward pass instead of keeping its activations.
        self.activation_checkpointing = False
        self.tie_head()
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

    def tie_head(self) -> None:
        """With tie_weights the head is the token table (again, after a load that assigned new tensors)."""
        if self.config.tie_weights:
            self.lm_head.weight = self.token_embedding.weight

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.transformer.wte if self.config.family == "gpt2" else self.model.embed_tokens

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.h if self.config.family == "gpt2" else self.model.layers

    @property
    def final_norm(self) -> nn.Module:
        return self.transformer.ln_f if self.config.family == "gpt2" else self.model.norm

    @staticmethod
    def positions(start_pos: torch.Tensor, N: int) -> torch.Tensor:
        """(B, N): start_pos[b] + 0, 1, ..."""
        return start_pos[:, None] + torch.arange(N, device=start_pos.device)

    def rope(self, start_pos: torch.Tensor, N: int, dtype: torch.dtype):
        """(cos, sin), each (B, N, D), for RoPE at positions start_pos[b] + 0, 1, ...; None for gpt2."""
        if self.config.family == "gpt2":
            return None
        freqs = self.positions(start_pos, N)[..., None].float() * rope_inv_freq(self.config, start_pos.device)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, N, D)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def table(self, name: str) -> nn.Embedding:
        """A discrete modality's embedding table."""
        return self.token_embedding if name == TEXT else self.embeddings[name]

    def head(self, name: str) -> nn.Linear:
        """A discrete modality's head over its own vocabulary."""
        return self.lm_head if name == TEXT else self.heads[name]

    def context_segments(self, context: dict | None, input_ids: torch.Tensor):
        """The context's segments in order, then the decoded prompt's: per segment (modality, embeddings (B, n, C),
        real-position mask (B, n) or None where every position is real, ids (B, n) or None for features).

        context: modality name -> features (B, P, F) for a continuous modality, (ids (B, T) right-padded,
        lengths (B,)) for a discrete one; None or {} for a segment without context (a decode step).
        """
        segments = []
        if context:
            missing = [n for n in self.config.context if n not in context]
            extra = sorted(set(context) - set(self.config.context))
            if missing or extra:
                raise UserError(f"the context must hold exactly the modalities {self.config.context} (missing "
                                f"{missing}, not in the model's context {extra})")
            for m in self.config.context_modalities:
                if m.kind == "continuous":
                    features = context[m.name]
                    segments.append((m, self.encoders[m.name](features.to(self.lm_head.weight.dtype)), None, None))
                else:
                    ids, lengths = context[m.name]
                    real = torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]  # (B, T)
                    segments.append((m, self.table(m.name)(ids), real, ids))
        decoded = self.config.decoded_modality
        segments.append((decoded, self.table(decoded.name)(input_ids), None, input_ids))
        return segments

    def pack(self, segments, start_pos: torch.Tensor):
        """Segments -> x (B, N, C) with positions start_pos[b] + 0, 1, ..., the destination of each unpacked
        position (B, N) (None: no ragged segment, nothing moves), and each row's real context length (B,).

        Real positions move to the front of their row in order, padding to the back, so that every real
        position attends to real ones only under the causal mask and a row's positions are contiguous."""
        x = torch.cat([e for _, e, _, _ in segments], dim=1)  # (B, N, C)
        B, N, _ = x.shape
        context = segments[:-1]
        lengths = [torch.full((B,), e.shape[1], dtype=torch.long, device=x.device) if real is None
                   else real.sum(1) for _, e, real, _ in context]
        context_len = torch.stack(lengths).sum(0) if lengths else torch.zeros(B, dtype=torch.long, device=x.device)
        dest = None
        if any(real is not None for _, _, real, _ in context):
            real = torch.cat([torch.ones(e.shape[:2], dtype=torch.bool, device=x.device) if r is None else r
                              for _, e, r, _ in segments], dim=1)  # (B, N)
            before = torch.cumsum(real.long(), dim=1) - 1  # real: its index among the real positions
            dest = torch.where(real, before, real.sum(1, keepdim=True) + torch.cumsum((~real).long(), dim=1) - 1)
            x = torch.zeros_like(x).scatter(1, dest[..., None].expand(B, N, x.shape[2]), x)
        if self.config.family != "gpt2":  # llama rotates q and k in attention instead
            return x, dest, context_len
        return self.transformer.drop(x + self.transformer.wpe(self.positions(start_pos, N))), dest, context_len

    def forward(self, context: dict | torch.Tensor | None, input_ids: torch.Tensor,
                targets: torch.Tensor | None = None):
        """Training forward over context + the decoded modality's ids (B, T). Returns the decoded modality's logits
        at its positions (B, T, V) and, given targets (B, T) with -100 where no loss is taken, the loss: per
        modality with a head, the mean cross-entropy of its next-token predictions, weighted by its loss_weight
        (a context modality with a head predicts its own next token within its segment)."""
        context = self.as_context(context)
        segments = self.context_segments(context, input_ids)
        B, T = input_ids.shape
        start = torch.zeros(B, dtype=torch.long, device=input_ids.device)
        x, dest, context_len = self.pack(segments, start)
        rope = self.rope(start, x.shape[1], x.dtype)
        recompute = self.activation_checkpointing and self.training
        for block in self.blocks:
            x = checkpoint(block, x, rope, use_reentrant=False) if recompute else block(x, rope)
        h = self.final_norm(x)
        where = (context_len[:, None] + torch.arange(T, device=x.device))[..., None].expand(B, T, h.shape[-1])
        decoded = self.config.decoded
        logits = self.head(decoded)(torch.gather(h, 1, where))  # (B, T, V): the decoded modality's positions
        if targets is None:
            return logits, None
        terms = [(self.config.decoded_modality.loss_weight,
                  F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100))]
        offset = 0
        for m, e, real, ids in segments[:-1]:
            if m.head:
                nxt = torch.full_like(ids, -100)  # position t predicts the segment's token t + 1, where there is one
                nxt[:, :-1] = torch.where(real[:, 1:], ids[:, 1:], -100)
                full = torch.full((B, x.shape[1]), -100, dtype=torch.long, device=x.device)
                full[:, offset:offset + ids.shape[1]] = nxt
                if dest is not None:
                    full = torch.full_like(full, -100).scatter(1, dest, full)
                terms.append((m.loss_weight, F.cross_entropy(self.head(m.name)(h).float().flatten(0, 1),
                                                             full.flatten(), ignore_index=-100)))
            offset += e.shape[1]
        loss = sum(w * term for w, term in terms) / sum(w for w, _ in terms)
        return logits, loss

    def as_context(self, context):
        """A bare tensor stands for the features of a model whose context is one continuous modality."""
        if context is None or isinstance(context, dict):
            return context
        only = self.config.context_modalities
        if len(only) != 1 or only[0].kind != "continuous":
            raise UserError(f"this model's context is {self.config.context}: pass a dict of each modality's input")
        return {only[0].name: context}

    def forward_cached(self, context, input_ids, input_lengths, start_pos, past_keys, past_values):
        """The inference step shared by prefill, decode and every backend.

        context: as `forward`'s, or None (a decode step); input_ids (B, T) right-padded ids of the decoded
        modality; input_lengths (B,) real tokens per row; start_pos (B,) position of the segment's first element;
        past_keys/values: one (B, H_kv, S, D) per layer, slot j valid for row b iff j < start_pos[b] (S may be 0), or
        None for a prefill with no past.
        Returns logits (B, V) of the decoded modality at each row's last real token, and per layer the new
        segment's keys and values (B, H_kv, N, D), each row's real positions first (context, then prompt).
        """
        x, _, context_len = self.pack(self.context_segments(self.as_context(context), input_ids), start_pos)
        B, N, _ = x.shape
        rope = self.rope(start_pos, N, x.dtype)
        if past_keys is None:  # prefill: no past inputs at all, so the graph has no zero-size tensors; causal
            past_keys = past_values = [None] * len(self.blocks)
            mask = None
        else:
            causal = torch.ones(N, N, dtype=torch.bool, device=x.device).tril()[None, None].expand(B, 1, N, N)
            slots = torch.arange(past_keys[0].shape[2], device=x.device)
            past_ok = (slots[None, :] < start_pos[:, None])[:, None, None, :]  # (B, 1, 1, S)
            mask = torch.cat([past_ok.expand(B, 1, N, slots.shape[0]), causal], dim=-1)  # (B, 1, N, S+N)
        new_keys, new_values = [], []
        for block, pk, pv in zip(self.blocks, past_keys, past_values):
            x, k, v = block.forward_cached(x, pk, pv, mask, rope)
            new_keys.append(k)
            new_values.append(v)
        last = (context_len + input_lengths - 1)[:, None, None].expand(B, 1, x.shape[-1])  # (B, 1, C)
        h = self.final_norm(torch.gather(x, 1, last)[:, 0])  # (B, C): only the rows' last real tokens
        return self.head(self.config.decoded)(h), new_keys, new_values
