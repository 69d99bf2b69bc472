"""Training: the LightningModule and `train(cfg)`, the plain function train.py and the tests call."""
from __future__ import annotations

import math
import os
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from mmgpt.model import GPTConfig, MultimodalGPT
from mmgpt.runtime.backends import TorchBackend
from mmgpt.runtime.generator import Generator
from mmgpt.tokenizer import ByteTokenizer


class MultimodalGPTModule(L.LightningModule):
    """Loss on text tokens only; validation reports loss and exact match of greedy captions."""

    def __init__(self, model_config: dict, tokenizer: dict, optimizer=None, warmup_steps: int = 100,
                 min_lr_ratio: float = 0.1, max_new_tokens: int = 32, prefix_len: int | None = None,
                 data_config: dict | None = None):
        super().__init__()
        # plain dicts only: the checkpoint loads with torch.load(weights_only=True) and rebuilds the model
        self.save_hyperparameters(ignore=["optimizer"])
        self.model = MultimodalGPT(GPTConfig.from_dict(model_config))
        self.tokenizer = ByteTokenizer.from_dict(tokenizer)
        self.optimizer_factory = optimizer
        self._val_hits = self._val_total = 0

    def training_step(self, batch, batch_idx):
        _, loss = self.model(batch["prefix"], batch["input_ids"], batch["targets"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["captions"]))
        return loss

    def on_validation_epoch_start(self):
        self._val_hits = self._val_total = 0
        self._val_generator = Generator(TorchBackend(self.model), self.tokenizer,
                                        max_positions=self.model.config.block_size, cuda_graph=False)

    def validation_step(self, batch, batch_idx):
        B = len(batch["captions"])
        _, loss = self.model(batch["prefix"], batch["input_ids"], batch["targets"])
        self.log("val/loss", loss, prog_bar=True, batch_size=B, sync_dist=True)
        result = self._val_generator.generate(batch["prefix"], max_new_tokens=self.hparams.max_new_tokens)
        self._val_hits += sum(p == r for p, r in zip(result.texts, batch["captions"]))
        self._val_total += B

    def on_validation_epoch_end(self):
        counts = torch.tensor([self._val_hits, self._val_total], dtype=torch.float64, device=self.device)
        counts = self.all_gather(counts).reshape(-1, 2).sum(0)  # exact over every rank's samples
        self.log("val/exact_match", (counts[0] / counts[1].clamp(min=1)).item(), prog_bar=True, rank_zero_only=True)

    def configure_optimizers(self):
        factory = self.optimizer_factory or (lambda params: torch.optim.AdamW(params, lr=1e-3))
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.dim() < 2]
        opt = factory([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup, floor = min(self.hparams.warmup_steps, total), self.hparams.min_lr_ratio

        def lr_lambda(step):  # linear warm-up, then cosine down to min_lr_ratio of the peak
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint):
        # Everything needed to rebuild the model without this repo's config files.
        checkpoint["mmgpt"] = {"model_config": self.model.config.to_dict(), "tokenizer": self.tokenizer.to_dict(),
                               "prefix_len": self.hparams.prefix_len, "data": self.hparams.data_config, "format": 1}


def build_module(cfg: DictConfig, datamodule) -> MultimodalGPTModule:
    model_config = OmegaConf.to_container(cfg.model, resolve=True)
    model_config.update(vocab_size=max(model_config.get("vocab_size", 0), datamodule.tokenizer.vocab_size),
                        prefix_dim=datamodule.prefix_dim)
    return MultimodalGPTModule(model_config=model_config, tokenizer=datamodule.tokenizer.to_dict(),
                               optimizer=hydra.utils.instantiate(cfg.optimizer), prefix_len=datamodule.prefix_len,
                               data_config=OmegaConf.to_container(cfg.data, resolve=True),
                               **OmegaConf.to_container(cfg.module, resolve=True))


def train(cfg: DictConfig) -> dict:
    """Train (and validate) from a composed config. Returns the final metrics and where things were written."""
    os.environ.setdefault("WANDB_MODE", "offline")  # no network needed; an explicit WANDB_MODE wins
    L.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")
    block = cfg.model.block_size
    if datamodule.prefix_len + datamodule.max_caption_tokens > block:
        raise ValueError(f"prefix ({datamodule.prefix_len}) + longest caption ({datamodule.max_caption_tokens}) "
                         f"exceeds model.block_size={block}; raise model.block_size")
    module = build_module(cfg, datamodule)

    out_dir = Path(cfg.paths.output_dir)
    ckpt_cb = L.pytorch.callbacks.ModelCheckpoint(dirpath=out_dir / "checkpoints", filename="best-{step}",
                                                  monitor="val/exact_match", mode="max", save_last=True,
                                                  auto_insert_metric_name=False)
    callbacks = [ckpt_cb, L.pytorch.callbacks.LearningRateMonitor(logging_interval="step")]
    logger = hydra.utils.instantiate(cfg.logger) if cfg.get("logger") else False
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=logger,
                                                 default_root_dir=str(out_dir))
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    result = {"metrics": metrics, "global_step": trainer.global_step, "output_dir": str(out_dir),
              "last_ckpt": ckpt_cb.last_model_path, "best_ckpt": ckpt_cb.best_model_path,
              "wandb_dir": None}
    if trainer.is_global_zero:
        if isinstance(logger, L.pytorch.loggers.WandbLogger):
            result["wandb_dir"] = str(Path(logger.experiment.dir).parent)
            logger.experiment.finish()
        print(f"\nval/exact_match = {metrics.get('val/exact_match', float('nan')):.4f}   "
              f"val/loss = {metrics.get('val/loss', float('nan')):.4f}   global_step = {trainer.global_step}")
        print(f"checkpoint:  {ckpt_cb.last_model_path}  (best: {ckpt_cb.best_model_path})")
        if result["wandb_dir"]:
            print(f"W&B run:     {result['wandb_dir']}  (offline: `wandb sync {result['wandb_dir']}` uploads it)")
    return result
