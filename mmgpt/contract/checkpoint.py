"""The `"mmgpt"` entry of a training checkpoint: everything needed to rebuild the model without this repository's
config files, and the schedule a resumed run continues. Written and validated here only.

Lightning's own entries (state_dict, global_step, optimizer states) sit beside it; this type owns only its entry.
A checkpoint of another format is refused with what to do: re-train, or use the mmgpt that wrote it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from mmgpt.contract.typed import build
from mmgpt.errors import UserError

CHECKPOINT_FORMAT = 3  # 3: modalities in the model config, context_lens
META_KEY = "mmgpt"


class CheckpointError(UserError):
    """The checkpoint is missing, unreadable, or not an mmgpt model; the message says which and what to do."""


@dataclass(frozen=True)
class Schedule:
    total_steps: int  # trainer.max_steps of the run that wrote it: a resumed run with another total decays from here


@dataclass(frozen=True)
class CheckpointMeta:
    model_config: dict  # GPTConfig fields
    tokenizer: dict  # mmgpt.tokenizer.tokenizer_from_dict's input
    context_lens: dict[str, int]  # continuous context modality -> the length it was trained with (absent: any)
    data: dict | None  # the training data config: rebuilds the exact validation split
    schedule: Schedule
    format: int = CHECKPOINT_FORMAT

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def of(cls, checkpoint: dict, path) -> "CheckpointMeta":
        """The meta entry of a loaded checkpoint dict, checked: its format first, then every field."""
        raw = checkpoint.get(META_KEY) if isinstance(checkpoint, dict) else None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path}: not an mmgpt checkpoint (no '{META_KEY}' model config inside). "
                                  "Use a last.ckpt / best-*.ckpt written by mmgpt's train.py")
        version = raw.get("format", 1)
        if version != CHECKPOINT_FORMAT:
            newer = isinstance(version, int) and version > CHECKPOINT_FORMAT
            raise CheckpointError(
                f"{path}: checkpoint format {version!r}, this mmgpt reads format {CHECKPOINT_FORMAT}: it was written "
                f"by {'a newer' if newer else 'an older'} mmgpt. Use the mmgpt version that wrote it, or re-train "
                "with this one (`python train.py +experiment=...`)")
        try:
            return build(cls, raw, META_KEY)
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: its '{META_KEY}' entry is damaged ({e}); use another checkpoint of that "
                                  "run (checkpoints/best-*.ckpt) or re-train") from None
