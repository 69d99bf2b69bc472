"""Training: the LightningModule (module.py), the callbacks and checkpoint writer (callbacks.py), the learning-rate
schedule and resume checks (schedule.py), and `train(cfg)` (run.py), the plain function train.py and the tests
call."""
from mmgpt.training.run import train

__all__ = ["train"]
