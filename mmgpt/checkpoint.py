"""Checkpoint -> model: a training checkpoint carries the model config and tokenizer, nothing else is needed."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from mmgpt.model import GPTConfig, MultimodalGPT
from mmgpt.tokenizer import ByteTokenizer


class CheckpointError(ValueError):
    """The checkpoint is missing, unreadable, or not an mmgpt model; the message says which and what to do."""


@dataclass
class LoadedModel:
    model: MultimodalGPT
    tokenizer: ByteTokenizer
    prefix_len: int | None
    data_config: dict | None  # the training data config: rebuilds the exact validation split
    path: Path


def load_checkpoint(path, map_location="cpu") -> LoadedModel:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint. Train one with `python train.py +experiment=digits` "
                              "or pass ckpt=/path/to/last.ckpt")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle garbage, ...
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}). Was it written completely?") from None
    meta = ckpt.get("mmgpt") if isinstance(ckpt, dict) else None
    if meta is None or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not an mmgpt checkpoint (no 'mmgpt' model config inside). "
                              "Use a last.ckpt / best-*.ckpt written by mmgpt's train.py")
    try:
        config = GPTConfig.from_dict(meta["model_config"])
        tokenizer = ByteTokenizer.from_dict(meta["tokenizer"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its model config is invalid ({e})") from None
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model = MultimodalGPT(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_weights]
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the model config inside it "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, prefix_len=meta.get("prefix_len"),
                       data_config=meta.get("data"), path=path)


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 over parameter names, shapes, dtypes and bytes: an engine built from other weights is refused."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def find_latest(root, pattern: str) -> Path | None:
    """Newest file matching pattern under root (by modification time), or None."""
    root = Path(root)
    found = sorted(root.glob(pattern), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    return found[-1] if found else None
