"""Checks of what a caller hands the decode loop (features, prompts, lengths), shared by the static generator and the
in-flight engine, so that a bad input fails the same way, with the same message, before anything runs."""
from __future__ import annotations

import operator

import torch

from mmgpt.errors import UserError


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


def capacity_for(backend, prefix: torch.Tensor, prompt_len: int, max_new_tokens: int, buckets) -> int:
    """Validate a (B, P, F) prefix, a prompt length and a token budget against the backend before anything runs;
    returns the smallest capacity bucket that holds them."""
    check_prefix(prefix, backend.dtype)
    B, P, F = prefix.shape
    if F != backend.dims.prefix_dim:
        raise UserError(f"prefix feature size F={F}, but the model expects F={backend.dims.prefix_dim}")
    if backend.prefix_len is not None and P != backend.prefix_len:
        raise UserError(f"prefix length P={P}, but the exported graphs expect P={backend.prefix_len}")
    if backend.max_batch is not None and B > backend.max_batch:
        raise UserError(f"batch {B} exceeds the {backend.name} backend's max batch {backend.max_batch}; split the "
                        "batch (infer.py does) or, for engines, rebuild with a larger engine.profiles.batch")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UserError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    need = P + prompt_len + max_new_tokens
    for s in buckets:
        if need <= s:
            return s
    raise UserError(f"prefix ({P}) + prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) = {need} "
                    f"exceeds the largest cache capacity {buckets[-1]}; lower max_new_tokens to "
                    f"{buckets[-1] - P - prompt_len} or less")
