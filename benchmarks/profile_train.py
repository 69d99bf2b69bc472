"""Where train.py's step time goes: the host side of Lightning's loop around the compiled, captured step.

    python benchmarks/profile_train.py [--at 300] [--steps 10] [Hydra overrides for train.py]
    (default overrides: +experiment=digits_gpt2_124m logger=csv trainer.max_steps=400)

Runs `train(cfg)` as train.py does, and for --steps steps from step --at (after compilation and CUDA-graph
recording):
1. `torch.cuda.set_sync_debug_mode("warn")`: each operation that makes the host wait for the GPU warns, printed
   once per place with the Python stack that reached it;
2. `torch.profiler` over CPU and CUDA: host time per operator (self CPU time) and the GPU's busy time, so a step
   bound by the host (GPU idle between kernels) shows as CPU time per step above CUDA time per step.
Needs a CUDA GPU. Prints the tables; writes nothing but the run's own outputs.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from torch.profiler import ProfilerActivity, profile

from mmgpt.throughput import ThroughputMonitor
from mmgpt.training import train

CONF = Path(__file__).resolve().parent.parent / "conf"


class ProfilingMonitor(ThroughputMonitor):
    """train.py's throughput callback, profiling steps [at, at + steps); configured in place of it."""

    def __init__(self, at: int, steps: int, **kwargs):
        super().__init__(**kwargs)
        self.at, self.steps, self.prof = at, steps, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if trainer.global_step == self.at:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
            self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self.prof.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.prof is not None and trainer.global_step == self.at + self.steps:
            torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            report(self.prof, self.steps)
            self.prof = None


def report(prof, steps: int):
    events = prof.key_averages()
    cpu_total = sum(e.self_cpu_time_total for e in events) / steps / 1e3
    cuda_total = sum(e.self_device_time_total for e in events) / steps / 1e3
    print(f"\nper step over {steps} steps: host (self CPU, all operators) {cpu_total:.2f} ms, "
          f"GPU busy (self CUDA) {cuda_total:.2f} ms")
    print(events.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70))
    print(events.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=70))


def show_sync_warnings():
    seen = set()

    def show(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" not in str(message):
            return original(message, category, filename, lineno, file, line)
        stack = "".join(traceback.format_stack(limit=12)[:-1])
        if (filename, lineno) not in seen:
            seen.add((filename, lineno))
            print(f"\nSYNC at {filename}:{lineno}: {message}\n{stack}", file=sys.stderr)
    original = warnings.showwarning
    warnings.showwarning = show
    warnings.simplefilter("always")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--at", type=int, default=300, help="first profiled step (after compilation and recording)")
    ap.add_argument("--steps", type=int, default=10)
    args, overrides = ap.parse_known_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU: it profiles the GPU training step")
    overrides = overrides or ["+experiment=digits_gpt2_124m", "logger=csv", f"trainer.max_steps={args.at + 100}"]
    if not any(o.startswith("paths.output_dir=") for o in overrides):
        overrides.append(f"paths.output_dir={tempfile.mkdtemp(prefix='profile-train-')}")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.callbacks.throughput._target_ = f"{__name__}.ProfilingMonitor"
        cfg.callbacks.throughput.at, cfg.callbacks.throughput.steps = args.at, args.steps
    show_sync_warnings()
    result = train(cfg)
    print(f"\ntrain.py's summary: {result['throughput']}")


if __name__ == "__main__":
    main()
