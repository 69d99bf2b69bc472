"""What several test files share: composing Hydra configs, shrinking experiments to CPU seconds, tiny Hugging Face
GPT-2 directories."""
from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")


def compose_config(name: str, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def small_train_overrides(out: Path, steps: int = 4) -> list[str]:
    """Shrink any experiment to seconds on a CPU."""
    return [f"paths.output_dir={out}", "logger=csv", "trainer.accelerator=cpu", "trainer.devices=1",
            "trainer.precision=32-true", f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
            "trainer.enable_progress_bar=false", "data.batch_size=8"]
