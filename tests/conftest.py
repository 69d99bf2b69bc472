"""Shared fixtures: composed Hydra configs, a briefly trained digits checkpoint, and its export."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
try:  # without a GPU, Triton's interpreter runs the fused decode kernels on the CPU (set before triton is imported)
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass


def compose_config(name: str, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def small_train_overrides(out: Path, steps: int = 4) -> list[str]:
    """Shrink any experiment to seconds on a CPU."""
    return [f"paths.output_dir={out}", "logger=csv", "trainer.accelerator=cpu", "trainer.devices=1",
            "trainer.precision=32-true", f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
            "trainer.enable_progress_bar=false", "data.batch_size=8"]


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
