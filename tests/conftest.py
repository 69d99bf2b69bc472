"""Shared fixtures: composed Hydra configs, a briefly trained digits checkpoint, and its export."""
from __future__ import annotations

import os
import pytest

from helpers import compose_config, small_train_overrides

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
try:  # without a GPU, Triton's interpreter runs the fused decode kernels on the CPU (set before triton is imported)
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A tiny digits model trained for 300 steps (~25 s): captions well above chance, validation at the last step."""
    from mmgpt.training import train
    out = tmp_path_factory.mktemp("train")
    cfg = compose_config("train", ["+experiment=digits", *small_train_overrides(out, steps=300),
                                   "data.batch_size=64", "data.val_samples=64", "data.train_samples=4000"])
    result = train(cfg)
    return result


@pytest.fixture(scope="session")
def exported(trained, tmp_path_factory):
    """fp32 export of the trained checkpoint, with parity checked, no engines."""
    from mmgpt.export.pipeline import export
    root = tmp_path_factory.mktemp("artifacts")
    cfg = compose_config("export", [f"ckpt={trained['last_ckpt']}", f"output_root={root}", "name=digits",
                                    "engine=none"])
    return export(cfg)
