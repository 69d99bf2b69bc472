"""Training: the LightningModule and `train(cfg)`, the plain function train.py and the tests call."""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from mmgpt.model import GPTConfig, MultimodalGPT
from mmgpt.runtime.backends import TorchBackend
from mmgpt.runtime.generator import Generator
from mmgpt.throughput import ThroughputMonitor
from mmgpt.tokenizer import ByteTokenizer

log = logging.getLogger(__name__)


def _switch(value, auto: bool, name: str) -> bool:
    if value == "auto":
        return auto
    if isinstance(value, bool):
        return value
    raise ValueError(f"module.{name}={value!r}: use auto, true or false")


def compile_options(compile, cuda_graph, device: torch.device, world_size: int) -> dict | None:
    """torch.compile's arguments for the training loss, or None to run eagerly.

    compile auto = on for CUDA. cuda_graph auto = on for CUDA in one process: compile's "reduce-overhead" mode then
    replays the forward and the backward as CUDA graphs, which needs the fixed batch shape the data modules give.
    Several processes leave it off by default: DDP's all-reduce hooks have not been tried on the replayed backward.
    """
    on_cuda = device.type == "cuda"
    if not _switch(compile, on_cuda, "compile"):
        if cuda_graph is True:
            raise ValueError("module.cuda_graph=true captures the compiled step: it needs module.compile=true or auto")
        return None
    graph = _switch(cuda_graph, on_cuda and world_size == 1, "cuda_graph")
    if graph and not on_cuda:
        raise ValueError(f"module.cuda_graph=true needs a CUDA device, training runs on {device}")
    return {"mode": "reduce-overhead" if graph else "default", "dynamic": False}


class MultimodalGPTModule(L.LightningModule):
    """Loss on text tokens only; validation reports loss and exact match of greedy captions."""

    def __init__(self, model_config: dict, tokenizer: dict, optimizer=None, warmup_steps: int = 100,
                 min_lr_ratio: float = 0.1, max_new_tokens: int = 32, prefix_len: int | None = None,
                 data_config: dict | None = None, compile: bool | str = "auto", cuda_graph: bool | str = "auto",
                 activation_checkpointing: bool = False):
        super().__init__()
        # plain dicts only: the checkpoint loads with torch.load(weights_only=True) and rebuilds the model
        self.save_hyperparameters(ignore=["optimizer"])
        self.model = MultimodalGPT(GPTConfig.from_dict(model_config))
        self.model.activation_checkpointing = activation_checkpointing
        self.tokenizer = ByteTokenizer.from_dict(tokenizer)
        self.optimizer_factory = optimizer
        self._val_hits = self._val_total = 0
        self._train_loss = self._loss  # compiled in on_fit_start where module.compile says so
        self._cuda_graph = False
        self._val_generator: Generator | None = None

    def _loss(self, prefix, input_ids, targets):
        # Only the loss leaves the compiled region: the full logits need not be kept as an output.
        return self.model(prefix, input_ids, targets)[1]

    def on_fit_start(self):
        options = compile_options(self.hparams.compile, self.hparams.cuda_graph, self.device, self.trainer.world_size)
        if options is not None:
            self._train_loss = torch.compile(self._loss, **options)
            self._cuda_graph = options["mode"] == "reduce-overhead"
        log.info("training step: %s", "eager" if options is None else f"torch.compile, mode {options['mode']}")

    def training_step(self, batch, batch_idx):
        if self._cuda_graph:  # this step's replay may overwrite the previous step's graph outputs
            torch.compiler.cudagraph_mark_step_begin()
        loss = self._train_loss(batch["prefix"], batch["input_ids"], batch["targets"])
        # Not in the progress bar: Lightning would read a bar metric back from the GPU every step. The
        # ThroughputMonitor shows the loss there, read when the GPU is done with it.
        self.log("train/loss", loss, batch_size=batch["input_ids"].shape[0])
        return loss

    def on_validation_epoch_start(self):
        self._val_hits = self._val_total = 0
        if self._val_generator is None:
            # Built once per fit: on a GPU its decode steps are captured as CUDA graphs, which read the parameters
            # where they live; the optimizer updates them in place, so every validation decodes the current model.
            self._val_generator = Generator(TorchBackend(self.model), self.tokenizer,
                                            max_positions=self.model.config.block_size,
                                            cuda_graph=self.device.type == "cuda")

    def validation_step(self, batch, batch_idx):
        B = len(batch["captions"])
        _, loss = self.model(batch["prefix"], batch["input_ids"], batch["targets"])
        self.log("val/loss", loss, prog_bar=True, batch_size=B, sync_dist=True)
        # Decoding in the parameters' own dtype: under autocast the graph captured here would read the bf16 weight
        # copies autocast cached for this step (the loss above made them), freed when the step ends, never updated.
        with torch.autocast(self.device.type, enabled=False):
            result = self._val_generator.generate(batch["prefix"], max_new_tokens=self.hparams.max_new_tokens)
        self._val_hits += sum(p == r for p, r in zip(result.texts, batch["captions"]))
        self._val_total += B

    def on_validation_epoch_end(self):
        counts = torch.tensor([self._val_hits, self._val_total], dtype=torch.float64, device=self.device)
        counts = self.all_gather(counts).reshape(-1, 2).sum(0)  # exact over every rank's samples
        self.log("val/exact_match", (counts[0] / counts[1].clamp(min=1)).item(), prog_bar=True, rank_zero_only=True)

    def teardown(self, stage):
        self._val_generator = None  # its graphs point at this device's parameters; Lightning may move them after fit

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
    throughput = ThroughputMonitor(peak_flops=cfg.throughput.peak_flops)
    callbacks = [ckpt_cb, L.pytorch.callbacks.LearningRateMonitor(logging_interval="step"), throughput]
    logger = hydra.utils.instantiate(cfg.logger) if cfg.get("logger") else False
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=logger,
                                                 default_root_dir=str(out_dir))
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    fit_s = time.perf_counter() - start

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    summary = throughput.summary
    result = {"metrics": metrics, "global_step": trainer.global_step, "output_dir": str(out_dir),
              "last_ckpt": ckpt_cb.last_model_path, "best_ckpt": ckpt_cb.best_model_path,
              "wandb_dir": None, "throughput": summary.to_dict() if summary else None, "fit_seconds": fit_s}
    if trainer.is_global_zero:
        if isinstance(logger, L.pytorch.loggers.WandbLogger):
            result["wandb_dir"] = str(Path(logger.experiment.dir).parent)
            logger.experiment.finish()
        print(f"\nval/exact_match = {metrics.get('val/exact_match', float('nan')):.4f}   "
              f"val/loss = {metrics.get('val/loss', float('nan')):.4f}   global_step = {trainer.global_step}")
        if summary:
            print(f"throughput:  {summary.line()}")
        print(f"fit:         {fit_s:.1f} s for {trainer.global_step} steps (validation and checkpoints included)")
        print(f"checkpoint:  {ckpt_cb.last_model_path}  (best: {ckpt_cb.best_model_path})")
        if result["wandb_dir"]:
            print(f"W&B run:     {result['wandb_dir']}  (offline: `wandb sync {result['wandb_dir']}` uploads it)")
    return result
