"""python export.py [ckpt=...] [dtype=fp16] [engine=tensorrt_rtx] [engine.strategy=shared]
python export.py artifacts=artifacts/<name> engine=tensorrt   (engines only, on the machine that runs them)
python export.py inspect=artifacts/<name>/shared.engine"""
import hydra
from omegaconf import DictConfig

from mmgpt.cli import run_command
from mmgpt.strict_config import check_config


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    if cfg.inspect:
        from mmgpt.engines.inspection import format_inspection, inspect_engine
        run_command(lambda: print(format_inspection(inspect_engine(cfg.inspect))))
        return
    from mmgpt.export.pipeline import export
    run_command(lambda: export(check_config(cfg, "export")))


if __name__ == "__main__":
    main()
