"""Checks of what a caller hands the decode loop (each context modality's input, prompts, budgets), shared by the
static generator and the in-flight engine, so that a bad input fails the same way, with the same message, before
anything runs."""
from __future__ import annotations

import operator

import torch

from mmgpt.data.samples import right_pad
from mmgpt.errors import UserError
from mmgpt.model import TEXT


def check_features(features, dtype: torch.dtype | None = None, what: str = "features") -> torch.Tensor:
    """A (B, P, F) float tensor with B, F >= 1 (P = 0: no context of this modality), finite in `dtype`, the dtype
    the backend runs (a value that fits float32 may overflow float16)."""
    if not torch.is_tensor(features) or features.ndim != 3 or features.shape[0] < 1 or features.shape[2] < 1:
        raise UserError(f"{what} must be a (B, P, F) tensor with B >= 1 and F >= 1, got shape "
                        f"{tuple(getattr(features, 'shape', ()))}")
    if not features.is_floating_point():
        raise UserError(f"{what} must be a float tensor, got {features.dtype}")
    # the largest magnitude first (NaN propagates through amax); the exact cast only where it may overflow
    if dtype is not None and features.numel() and not bool(features.abs().amax() <= torch.finfo(dtype).max) \
            and not bool(torch.isfinite(features.to(dtype)).all()):
        raise UserError(f"{what}: NaN or infinite values in the model's dtype "
                        f"{str(dtype).removeprefix('torch.')} (the largest float16 is "
                        f"{torch.finfo(torch.float16).max:.0f}); scale or clean the features")
    return features


def check_token_ids(prompts, vocab_size: int, what: str = "prompt") -> list[list[int]]:
    """Every id must index a row of its modality's embedding table (out of range: an index error on a GPU, or
    garbage). Returns the rows as lists of Python ints."""
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


def special_ids(dims, tokenizer) -> tuple[int, int, int]:
    """(start, end, pad) of the decoded modality: the tokenizer's BOS / EOS / PAD for text; another modality's end
    token also starts its sequences and pads its prompts, as GPT-2's <|endoftext|> does."""
    if dims.decoded.name == TEXT:
        return tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
    end = dims.decoded.end_id
    return end, end, end


def check_context(backend, context, to_device: bool = True) -> tuple[dict, int, torch.Tensor]:
    """A batch's context checked against the model's -> modality -> features (B, P, F) (moved to the backend's
    device when to_device) or token lists, the batch size, and each row's real context length (B,).

    context: modality -> features (B, P, F), or token lists / (ids, lengths); a bare (B, P, F) tensor for a model
    whose context is one continuous modality."""
    dims = backend.dims
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
            check_features(value, backend.dtype, what=f"{m.name} features")
            B, P, F = value.shape
            if F != m.dim:
                raise UserError(f"{m.name} features have F={F}, but the model expects F={m.dim}")
            fixed = backend.context_lens.get(m.name)
            if fixed is not None and P != fixed:
                raise UserError(f"{m.name} length P={P}, but the exported graphs expect P={fixed}")
            # not moved: a copy, so that a caller reusing its tensor cannot change a request already checked
            out[m.name] = value.to(backend.device) if to_device else value.clone()
            lengths.append(torch.full((B,), P, dtype=torch.long))
        else:
            out[m.name] = check_token_ids(token_rows(value, f"{m.name} context"), m.vocab_size,
                                          f"{m.name} context row")
            lengths.append(torch.tensor([len(r) for r in out[m.name]], dtype=torch.long))
        batch.add(len(lengths[-1]))
    if len(batch) > 1:
        raise UserError(f"the context's modalities have different batch sizes {sorted(batch)}; give one row each")
    B = batch.pop() if batch else 1
    return out, B, torch.stack(lengths).sum(0) if lengths else torch.zeros(B, dtype=torch.long)


def batch_context(dims, rows: list[dict], device) -> dict:
    """Per-row contexts (modality -> (P, F) features or a token list) -> the batch context forward_cached takes:
    features stacked (B, P, F), token lists right-padded as (ids (B, T), lengths (B,))."""
    out = {}
    for m in dims.context:
        if m.kind == "continuous":
            out[m.name] = torch.stack([r[m.name] for r in rows]).to(device)
        else:
            ids, n = right_pad([r[m.name] for r in rows], m.end_id if m.end_id is not None else 0)
            out[m.name] = (ids.to(device), n.to(device))
    return out


def capacity_for(backend, batch: int, context_len: int, prompt_len: int, max_new_tokens: int, buckets) -> int:
    """Validate a batch size, the longest real context, a prompt length and a token budget against the backend
    before anything runs; returns the smallest capacity bucket that holds them."""
    if backend.max_batch is not None and batch > backend.max_batch:
        raise UserError(f"batch {batch} exceeds the {backend.name} backend's max batch {backend.max_batch}; split "
                        "the batch (infer.py does) or, for engines, rebuild with a larger engine.profiles.batch")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UserError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    need = context_len + prompt_len + max_new_tokens
    for s in buckets:
        if need <= s:
            return s
    raise UserError(f"context ({context_len}) + prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) = {need} "
                    f"exceeds the largest cache capacity {buckets[-1]}; lower max_new_tokens to "
                    f"{buckets[-1] - context_len - prompt_len} or less")
