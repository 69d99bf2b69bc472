"""python export.py [ckpt=...] [dtype=fp16] [engine=tensorrt_rtx] [engine.strategy=shared] [inspect=path.engine]"""
import hydra
from omegaconf import DictConfig

from mmgpt.export.pipeline import export


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    if cfg.inspect:
        from mmgpt.engines.inspect import print_inspection
        print_inspection(cfg.inspect)
        return
    export(cfg)


if __name__ == "__main__":
    main()
