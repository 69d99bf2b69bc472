"""python serve.py [artifacts=...] [port=8000] [api_key=...] [address=<ray cluster> num_replicas=N]
An OpenAI-compatible server (/v1/models, /v1/completions, /v1/chat/completions) on Ray Serve."""
import hydra
from omegaconf import DictConfig

from mmgpt.cli import run_command
from mmgpt.serving.deployment import serve
from mmgpt.strict_config import check_config


@hydra.main(version_base="1.3", config_path="conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    run_command(lambda: serve(check_config(cfg, "serve")))


if __name__ == "__main__":
    main()
