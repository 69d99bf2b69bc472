"""A callback the SIGTERM test adds to train.py through conf/callbacks/ (`+callbacks.sigterm._target_=...`): the
process sends itself SIGTERM after a given step, as a cluster's preemption would, through the real signal path."""
import os
import signal

import lightning as L


class SigtermAt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)
