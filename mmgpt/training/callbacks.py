"""What train.py runs beside the module, each configurable from conf/callbacks/ by `_target_`: validation at the
last step, the periodic checkpoint, the save on SIGTERM; and the checkpoint writer, which replaces a file only once
its successor is complete."""
from __future__ import annotations

import io
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mmgpt.files import write_atomic


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints serialized in memory, written to a temporary file beside their path, then renamed over it: a
    full disk or a crash mid-write leaves the previous file as it was, never a truncated last.ckpt or best-*.ckpt."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, buffer.getvalue())


class FinalValidation(L.Callback):
    """Validate (and so checkpoint) at the last step whatever val_check_interval says: Lightning validates there
    when asked to stop, so ask at max_steps."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True


class PeriodicCheckpoint(ModelCheckpoint):
    """last.ckpt every `train_time_interval`. At the end of training Lightning saves last.ckpt again from each
    callback that has not saved one yet; when another checkpoint callback (the final validation's) has just written
    it at this step, a second write of a large model's checkpoint would only cost seconds."""

    def on_train_end(self, trainer, pl_module):
        last = self.format_checkpoint_name({}, self.CHECKPOINT_NAME_LAST)
        for other in trainer.checkpoint_callbacks:
            saved_at = getattr(other, "_last_global_step_saved", None)  # Lightning's own record; else save
            if other is not self and saved_at == trainer.global_step and other.last_model_path == last:
                return
        super().on_train_end(trainer, pl_module)


class SaveOnTerminate(L.Callback):
    """On SIGTERM (a cluster's preemption, `kill`), Lightning stops at the next step boundary; save there so the
    run resumes with ckpt_path=... having lost nothing."""

    def __init__(self, path):
        self.path = Path(path)

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, SIGTERMException) and trainer.global_step > 0:
            trainer.save_checkpoint(self.path)
