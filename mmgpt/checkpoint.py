"""Checkpoint -> model: a training checkpoint carries the model config, tokenizer and data config; nothing else is
needed to rebuild the model."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mmgpt.contract.checkpoint import CheckpointError, CheckpointMeta
from mmgpt.model import GPTConfig, MultimodalGPT
from mmgpt.tokenizer import tokenizer_from_dict


@dataclass
class LoadedModel:
    model: MultimodalGPT
    tokenizer: object  # ByteTokenizer | HFTokenizer
    context_lens: dict[str, int]  # continuous context modality -> the length it was trained with
    data_config: dict | None  # the training data config: rebuilds the exact validation split


def read_checkpoint(path) -> tuple[dict, CheckpointMeta]:
    """torch.load with messages that say what is wrong with the file, for every way a file can be wrong; the
    checkpoint's dict and its checked mmgpt entry."""
    path = Path(path)
    if path.is_dir():
        hint = (" It holds a Hugging Face config.json: train from it with `model.init_from=" f"{path}`"
                if (path / "config.json").is_file() else "")
        raise CheckpointError(f"{path}: a directory, not a checkpoint file; pass .../checkpoints/last.ckpt.{hint}")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint. Train one with `python train.py +experiment=digits` "
                              "or pass ckpt=/path/to/last.ckpt")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes); the run that wrote it was probably killed while "
                              "saving. Use another checkpoint of that run (checkpoints/best-*.ckpt) or retrain")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror}); check its permissions") from None
    except Exception as e:  # noqa: BLE001 - damaged bytes reach the unpickler, which can raise any type
        reason = "truncated or not a PyTorch file" if not str(e).strip() or "weights_only" in str(e) else \
            str(e).strip().splitlines()[0][:200]
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: {reason}). "
                              "Was it written completely, and by mmgpt's train.py?") from None
    meta = CheckpointMeta.of(ckpt, path)
    if "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: holds no weights (no 'state_dict'). Use a last.ckpt / best-*.ckpt written by "
                              "mmgpt's train.py")
    return ckpt, meta


def load_checkpoint(path) -> LoadedModel:
    path = Path(path)
    ckpt, meta = read_checkpoint(path)
    try:
        config = GPTConfig.from_dict(meta.model_config)
        tokenizer = tokenizer_from_dict(meta.tokenizer)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its model config is invalid ({e})") from None
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model = MultimodalGPT(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_weights]
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the model config inside it "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, context_lens=meta.context_lens,
                       data_config=meta.data)


def check_resume(path, model_fields: dict) -> None:
    """ckpt_path=: the checkpoint must hold the model the config describes (n_layer, n_head, n_embd, ...), else
    resuming fails deep inside the weight loading with a size-mismatch traceback. `model_fields` are the configured
    model's fields; fields the config does not set (the data sets vocab_size and each modality's dim, vocabulary and
    end token) are not compared."""
    saved = read_checkpoint(path)[1].model_config
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: its model config is missing or not an object; use a checkpoint written by "
                              "mmgpt's train.py")
    differ = {k: (saved[k], v) for k, v in model_fields.items() if k in saved and k != "modalities" and saved[k] != v}
    saved_modalities = {m.get("name"): m for m in saved.get("modalities", []) if isinstance(m, dict)}
    for m in model_fields.get("modalities") or []:  # the keys the config sets; the data set the others
        have = saved_modalities.get(m.get("name"), {})
        if any(have.get(k) != v for k, v in m.items()):
            differ[f"modalities[{m.get('name')}]"] = (have or None, m)
    if differ:
        raise CheckpointError(f"ckpt_path={path} holds another model: "
                              f"{', '.join(f'model.{k}={a!r} there, {b!r} here' for k, (a, b) in differ.items())}; "
                              "resume with the model it was trained with (e.g. the same +experiment / model=), or "
                              "start from its weights with model.init_from=" f"{path}")


def find_latest(root, pattern: str) -> Path | None:
    """Newest file matching pattern under root (by modification time), or None."""
    root = Path(root)
    found = sorted(root.glob(pattern), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    return found[-1] if found else None
