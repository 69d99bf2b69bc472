"""The learning-rate schedule and what a resumed run continues from: plain functions of step counts."""
from __future__ import annotations

import math

from mmgpt.checkpoint import CheckpointError, read_checkpoint


def lr_factor_fn(total: int, warmup_steps: int, min_lr_ratio: float, resumed: tuple[int, int] | None = None,
                 say=print):
    """Linear warm-up, then cosine down to min_lr_ratio of the peak at `total`. A run resumed (`resumed`: the step
    it resumes at and the total of the run that wrote the checkpoint) with another total continues from the factor
    it had reached and decays from there to the new end (no jump)."""
    warmup, floor = min(warmup_steps, total), min_lr_ratio

    def cosine(step, start, start_factor, end):
        progress = min(1.0, (step - start) / max(1, end - start))
        return floor + (start_factor - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    def planned(step, end):
        return (step + 1) / warmup if step < warmup else cosine(step, warmup, 1.0, end)

    if resumed is None or resumed[1] == total:
        return lambda step: planned(step, total)
    at, old_total = resumed
    reached = planned(at, old_total)
    say(f"resuming at step {at} of a {old_total}-step schedule with trainer.max_steps={total}: the learning rate "
        f"continues from {reached:.3g} x its peak and decays (cosine) to {floor:g} x at step {total}")
    return lambda step: planned(step, old_total) if step < at else cosine(step, at, reached, total)


def check_resume(ckpt_path, max_steps: int) -> int:
    """The step the checkpoint to resume was written at; refused (a clear message, before any setup) when the
    file is not a readable mmgpt checkpoint or max_steps leaves nothing to train."""
    ckpt, _ = read_checkpoint(ckpt_path)
    done = int(ckpt.get("global_step", 0))
    if done >= max_steps:
        raise CheckpointError(f"{ckpt_path} is at step {done}; trainer.max_steps={max_steps} leaves nothing to "
                              f"train: raise trainer.max_steps above {done}")
    return done
