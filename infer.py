"""python infer.py [artifacts=...] [backend=auto|tensorrt|torch|onnxruntime] [input=digits|file.npz|'imgs/*.png']"""
import hydra
from omegaconf import DictConfig

from mmgpt.runtime.infer import infer


@hydra.main(version_base="1.3", config_path="conf", config_name="infer")
def main(cfg: DictConfig) -> None:
    infer(cfg)


if __name__ == "__main__":
    main()
