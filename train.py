"""python train.py +experiment=digits [hydra overrides]"""
import hydra
from omegaconf import DictConfig

from mmgpt.cli import run_command
from mmgpt.strict_config import check_config


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from mmgpt.training import train
    result = run_command(lambda: train(check_config(cfg, "train")))
    return result["metrics"].get("val/exact_match")  # what a Hydra sweeper optimises


if __name__ == "__main__":
    main()
