"""python infer.py [artifacts=...] [backend=auto|tensorrt|torch|torch-triton|torch-persistent|onnxruntime]
                   [input=digits|file.npz|'imgs/*.png']"""
import hydra
from omegaconf import DictConfig

from mmgpt.cli import run_command
from mmgpt.strict_config import check_config
from mmgpt.inference import infer


@hydra.main(version_base="1.3", config_path="conf", config_name="infer")
def main(cfg: DictConfig) -> None:
    run_command(lambda: infer(check_config(cfg, "infer")))


if __name__ == "__main__":
    main()
