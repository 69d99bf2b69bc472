"""Training: the LightningModule and `train(cfg)`, the plain function train.py and the tests call.

From scratch (the model shape from conf/model/*.yaml, the byte-level tokenizer) or from a pretrained GPT-2
(`model.init_from=<Hugging Face directory>`: its shape, weights and tokenizer; the prefix encoder starts fresh).
Every run validates and saves at its last step, saves a resumable checkpoint every `checkpoint.every_minutes`, and
on SIGTERM saves one before it exits.
"""
from __future__ import annotations

import datetime
import functools
import inspect
import logging
import math
import os
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from mmgpt.checkpoint import CheckpointError, load_checkpoint, read_checkpoint
from mmgpt.contract.checkpoint import META_KEY, CheckpointMeta, Schedule
from mmgpt.model import GPTConfig, MultimodalGPT
from mmgpt.runtime.backends.torch_model import TorchBackend
from mmgpt.runtime.generator import Generator
from mmgpt.throughput import ThroughputMonitor
from mmgpt.tokenizer import check_tokenizer_fits, tokenizer_from_dict
from mmgpt.errors import UserError

log = logging.getLogger(__name__)
FREEZE = ("none", "lm")  # lm: only the prefix encoder learns (LLaVA's first stage); the LM stays bit-identical


def _switch(value, auto: bool, name: str) -> bool:
    if value == "auto":
        return auto
    if isinstance(value, bool):
        return value
    raise UserError(f"module.{name}={value!r}: use auto, true or false")


def compile_options(compile, cuda_graph, device: torch.device, world_size: int) -> dict | None:
    """torch.compile's arguments for the training loss, or None to run eagerly.

    compile auto = on for CUDA. cuda_graph auto = on for CUDA in one process: compile's "reduce-overhead" mode then
    replays the forward and the backward as CUDA graphs, which needs the fixed batch shape the data modules give.
    Several processes leave it off by default: DDP's all-reduce hooks have not been tried on the replayed backward.
    """
    on_cuda = device.type == "cuda"
    if not _switch(compile, on_cuda, "compile"):
        if cuda_graph is True:
            raise UserError("module.cuda_graph=true captures the compiled step: it needs module.compile=true or auto")
        return None
    graph = _switch(cuda_graph, on_cuda and world_size == 1, "cuda_graph")
    if graph and not on_cuda:
        raise UserError(f"module.cuda_graph=true needs a CUDA device, training runs on {device}")
    return {"mode": "reduce-overhead" if graph else "default", "dynamic": False}


class MultimodalGPTModule(L.LightningModule):
    """Loss on text tokens only; validation reports loss and exact match of greedy captions."""

    def __init__(self, model_config: dict, tokenizer: dict, optimizer=None, warmup_steps: int = 100,
                 min_lr_ratio: float = 0.1, max_new_tokens: int = 32, prefix_len: int | None = None,
                 data_config: dict | None = None, freeze: str = "none", lr_prefix: float | None = None,
                 lr_lm: float | None = None, compile: bool | str = "auto", cuda_graph: bool | str = "auto",
                 activation_checkpointing: bool = False, fused_optimizer: bool | str = "auto"):
        super().__init__()
        if freeze not in FREEZE:
            raise UserError(f"module.freeze={freeze!r}: choose one of {FREEZE}")
        # plain values only, and not the tokenizer (a GPT-2 one is megabytes): the checkpoint's "mmgpt" entry
        # carries it, and loads with torch.load(weights_only=True)
        self.save_hyperparameters(ignore=["optimizer", "tokenizer"])
        self.model = MultimodalGPT(GPTConfig.from_dict(model_config))
        self.model.activation_checkpointing = activation_checkpointing
        self.tokenizer = tokenizer_from_dict(tokenizer)
        self.optimizer_factory = optimizer
        self._val_hits = self._val_total = 0
        self._val_generator: Generator | None = None
        self._train_loss = self._loss  # compiled in on_fit_start where module.compile says so
        self._cuda_graph = False
        self.validated_at_step = -1
        self._resumed_schedule = None  # (step, total steps) of the checkpoint this run resumes
        if freeze == "lm":
            for name, p in self.model.named_parameters():
                p.requires_grad_(name.startswith("prefix_encoder."))

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
            # Built once per fit, un-captured: replaying graphs captured beside torch.compile's own CUDA graphs of
            # the training step crashed with an illegal memory access (benchmarks/NOTES.md).
            self._val_generator = Generator(TorchBackend(self.model), self.tokenizer,
                                            max_positions=self.model.config.block_size, cuda_graph=False)

    def validation_step(self, batch, batch_idx):
        B = len(batch["captions"])
        _, loss = self.model(batch["prefix"], batch["input_ids"], batch["targets"])
        self.log("val/loss", loss, prog_bar=True, batch_size=B, sync_dist=True)
        # Decoding in the parameters' own dtype (fp32 weights and KV cache, as export sees them), not autocast's bf16
        # weight copies of this step; a generator with CUDA graphs would also keep pointing at those freed copies.
        with torch.autocast(self.device.type, enabled=False):
            result = self._val_generator.generate(batch["prefix"], max_new_tokens=self.hparams.max_new_tokens)
        self._val_hits += sum(p == r for p, r in zip(result.texts, batch["captions"]))
        self._val_total += B

    def on_validation_epoch_end(self):
        counts = torch.tensor([self._val_hits, self._val_total], dtype=torch.float64, device=self.device)
        counts = self.all_gather(counts).reshape(-1, 2).sum(0)  # exact over every rank's samples
        self.log("val/exact_match", (counts[0] / counts[1].clamp(min=1)).item(), prog_bar=True, rank_zero_only=True)
        if not self.trainer.sanity_checking:
            self.validated_at_step = self.trainer.global_step

    def teardown(self, stage):
        self._val_generator = None  # its graphs point at this device's parameters; Lightning may move them after fit

    def parameter_groups(self) -> list[dict]:
        """AdamW groups: prefix encoder and language model may learn at different rates; no decay on biases and
        norms; frozen parameters are left out (so weight decay cannot touch them either)."""
        groups = []
        for part, lr in (("prefix_encoder.", self.hparams.lr_prefix), ("", self.hparams.lr_lm)):
            named = [(n, p) for n, p in self.model.named_parameters()
                     if p.requires_grad and (n.startswith("prefix_encoder.") == (part != ""))]
            for decay in (True, False):
                params = [p for n, p in named if (p.dim() >= 2) == decay]
                if params:
                    group = {"params": params, **({} if decay else {"weight_decay": 0.0})}
                    if lr is not None:
                        group["lr"] = lr
                    groups.append(group)
        return groups

    def configure_optimizers(self):
        factory = self.optimizer_factory or functools.partial(torch.optim.AdamW, lr=1e-3)
        opt = factory(self.parameter_groups(), **self._fused_kwargs(factory))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor_fn(int(self.trainer.max_steps)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _has_grad_scaler(self) -> bool:
        return getattr(self.trainer.precision_plugin, "scaler", None) is not None

    def _fused_kwargs(self, factory) -> dict:
        """`fused=True` for the optimizer where module.fused_optimizer says so: auto = on a GPU without a gradient
        scaler (bf16 or fp32; fp16's scaler would hand a fused optimizer scaled gradients to clip), when the
        optimizer takes `fused` and optimizer.fused is not set: a few fused kernels per step, little host work."""
        target = getattr(factory, "func", factory)
        takes = "fused" in inspect.signature(target).parameters
        scaler = self._has_grad_scaler()
        on_cuda = self.trainer.strategy.root_device.type == "cuda"
        if not _switch(self.hparams.fused_optimizer, takes and on_cuda and not scaler, "fused_optimizer") \
                or "fused" in getattr(factory, "keywords", {}):
            return {}
        if not takes:
            raise UserError(f"module.fused_optimizer=true, but {getattr(target, '__name__', target)} takes no "
                             "`fused` argument; use module.fused_optimizer=auto or false")
        if scaler:
            raise UserError(f"module.fused_optimizer=true with precision {self.trainer.precision}: its gradient "
                             "scaler and a fused optimizer cannot share gradient clipping; use precision "
                             "bf16-mixed, or module.fused_optimizer=false")
        return {"fused": True}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # Lightning refuses to clip for an optimizer that can unscale gradients itself (fused AdamW) under mixed
        # precision, to keep scaled gradients from being clipped. Without a gradient scaler (bf16, fp32) the
        # gradients are the true ones: clip them here, as Lightning's own path would.
        if self._has_grad_scaler() or not getattr(optimizer, "_step_supports_amp_scaling", False):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if not gradient_clip_val:
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def lr_factor_fn(self, total: int):
        """Linear warm-up, then cosine down to min_lr_ratio of the peak at `total`. A run resumed with another
        total continues from the factor it had reached and decays from there to the new end (no jump)."""
        warmup, floor = min(self.hparams.warmup_steps, total), self.hparams.min_lr_ratio

        def cosine(step, start, start_factor, end):
            progress = min(1.0, (step - start) / max(1, end - start))
            return floor + (start_factor - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        def planned(step, end):
            return (step + 1) / warmup if step < warmup else cosine(step, warmup, 1.0, end)

        if self._resumed_schedule is None or self._resumed_schedule[1] == total:
            return lambda step: planned(step, total)
        at, old_total = self._resumed_schedule
        reached = planned(at, old_total)
        L.pytorch.utilities.rank_zero_info(
            f"resuming at step {at} of a {old_total}-step schedule with trainer.max_steps={total}: the learning rate "
            f"continues from {reached:.3g} x its peak and decays (cosine) to {floor:g} x at step {total}")
        return lambda step: planned(step, old_total) if step < at else cosine(step, at, reached, total)

    def on_save_checkpoint(self, checkpoint):
        # Everything needed to rebuild the model without this repo's config files.
        meta = CheckpointMeta(model_config=self.model.config.to_dict(), tokenizer=self.tokenizer.to_dict(),
                              prefix_len=self.hparams.prefix_len, data=self.hparams.data_config,
                              schedule=Schedule(total_steps=int(self.trainer.max_steps)))
        checkpoint[META_KEY] = meta.to_dict()

    def on_load_checkpoint(self, checkpoint):
        meta = CheckpointMeta.of(checkpoint, "the checkpoint to resume")  # train() checked the file before fit
        self._resumed_schedule = (int(checkpoint["global_step"]), meta.schedule.total_steps)


class FinalValidation(L.Callback):
    """Validate (and so checkpoint) at the last step whatever val_check_interval says: Lightning validates there
    when asked to stop, so ask at max_steps."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True


class PeriodicCheckpoint(L.pytorch.callbacks.ModelCheckpoint):
    """last.ckpt every `train_time_interval`. At the end of training Lightning saves last.ckpt again from each
    callback that has not saved one yet; the final validation's checkpoint callback (`written_by`) has just
    written it at this step, and a second write of a large model's checkpoint costs seconds."""

    def __init__(self, written_by: L.pytorch.callbacks.ModelCheckpoint, **kwargs):
        super().__init__(**kwargs)
        self.written_by = written_by

    def on_train_end(self, trainer, pl_module):
        saved_at = getattr(self.written_by, "_last_global_step_saved", None)  # Lightning's own record; else save
        if saved_at == trainer.global_step and self.written_by.last_model_path == self.format_checkpoint_name(
                {}, self.CHECKPOINT_NAME_LAST):
            return
        super().on_train_end(trainer, pl_module)


class SaveOnTerminate(L.Callback):
    """On SIGTERM (a cluster's preemption, `kill`), Lightning stops at the next step boundary; save there so the
    run resumes with ckpt_path=... having lost nothing."""

    def __init__(self, path: Path):
        self.path = path

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, SIGTERMException) and trainer.global_step > 0:
            trainer.save_checkpoint(self.path)


def check_train_config(cfg: DictConfig) -> None:
    """What the config can get wrong, before any data is read or any weight allocated."""
    steps, every = cfg.trainer.get("max_steps"), cfg.trainer.get("val_check_interval")
    if not isinstance(steps, int) or steps < 1:
        raise UserError(f"trainer.max_steps={steps!r} must be a positive number of optimizer steps")
    if isinstance(every, (int, float)) and every <= 0:
        raise UserError(f"trainer.val_check_interval={every!r} must be > 0")
    minutes = cfg.checkpoint.every_minutes
    if not isinstance(minutes, (int, float)) or minutes <= 0:
        raise UserError(f"checkpoint.every_minutes={minutes!r} must be a positive number of minutes")
    if cfg.module.freeze not in FREEZE:
        raise UserError(f"module.freeze={cfg.module.freeze!r}: choose one of {FREEZE}")
    if cfg.module.freeze != "none" and not cfg.model.get("init_from"):
        raise UserError(f"module.freeze={cfg.module.freeze} keeps the language model as it is, which only makes "
                         "sense for a pretrained one: set model.init_from=<Hugging Face GPT-2 directory>")
    if cfg.get("ckpt_path"):
        ckpt, _ = read_checkpoint(cfg.ckpt_path)  # a clear message for an empty or foreign file, before any setup
        done = int(ckpt.get("global_step", 0))
        if done >= steps:
            raise CheckpointError(f"{cfg.ckpt_path} is at step {done}; trainer.max_steps={steps} leaves nothing to "
                                  f"train: raise trainer.max_steps above {done}")


def load_pretrained(cfg: DictConfig, datamodule):
    """model.init_from, checked before any training: a Hugging Face GPT-2 directory (its config, weights and
    tokenizer; the prefix encoder sized for the data, fresh) or an mmgpt checkpoint (every weight, e.g. a first
    stage's; a fresh optimizer and schedule). None when training from scratch."""
    source = cfg.model.get("init_from")
    if not source:
        return None
    from mmgpt.hf import HFGPT2, load_hf_gpt2
    if Path(source).is_file():
        loaded = load_checkpoint(source)
        if loaded.model.config.prefix_dim != datamodule.prefix_dim:
            raise UserError(f"model.init_from={source} reads prefixes of {loaded.model.config.prefix_dim} features, "
                             f"but the data's have {datamodule.prefix_dim}")
        return HFGPT2(loaded.model.config, loaded.model.state_dict(), loaded.tokenizer)
    free = {k: cfg.model[k] for k in ("prefix_encoder", "dropout") if k in cfg.model}
    return load_hf_gpt2(source, prefix_dim=datamodule.prefix_dim, **free)


def build_module(cfg: DictConfig, datamodule, pretrained=None) -> MultimodalGPTModule:
    """The model config, tokenizer and initial weights: from conf/model/ or from a pretrained GPT-2."""
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.pop("init_from", None)
    if model_cfg.get("prefix_dim", datamodule.prefix_dim) != datamodule.prefix_dim:
        raise UserError(f"model.prefix_dim={model_cfg['prefix_dim']}, but the data's prefix elements have "
                         f"{datamodule.prefix_dim} features; drop model.prefix_dim (the data sets it)")
    common = dict(optimizer=instantiate(cfg.optimizer), prefix_len=datamodule.prefix_len,
                  data_config=OmegaConf.to_container(cfg.data, resolve=True),
                  **OmegaConf.to_container(cfg.module, resolve=True))
    if pretrained is not None:
        from mmgpt.hf import load_language_model
        module = MultimodalGPTModule(model_config=pretrained.config.to_dict(),
                                     tokenizer=pretrained.tokenizer.to_dict(), **common)
        load_language_model(module.model, pretrained.state_dict)
        return module
    model_cfg.update(vocab_size=max(model_cfg.get("vocab_size", 0), datamodule.tokenizer.vocab_size),
                     prefix_dim=datamodule.prefix_dim)
    return MultimodalGPTModule(model_config=model_cfg, tokenizer=datamodule.tokenizer.to_dict(), **common)


def instantiate(node, **kwargs):
    """hydra.utils.instantiate, with a bad value's own message instead of Hydra's wrapper around it."""
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except hydra.errors.InstantiationException as e:
        if isinstance(e.__cause__, UserError):
            raise e.__cause__ from None
        raise


def train(cfg: DictConfig) -> dict:
    """Train (and validate) from a composed config. Returns the final metrics and where things were written."""
    check_train_config(cfg)
    os.environ.setdefault("WANDB_MODE", "offline")  # no network needed; an explicit WANDB_MODE wins
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    pretrained = load_pretrained(cfg, datamodule)
    if pretrained is not None:
        datamodule.tokenizer = pretrained.tokenizer
    datamodule.setup("fit")
    module = build_module(cfg, datamodule, pretrained)
    config = module.model.config
    check_tokenizer_fits(datamodule.tokenizer, config)
    if datamodule.prefix_len + datamodule.max_caption_tokens > config.block_size:
        raise UserError(f"prefix ({datamodule.prefix_len}) + longest caption ({datamodule.max_caption_tokens} "
                         f"tokens) exceeds the model's {config.block_size} positions; raise model.block_size or "
                         "shorten the captions")

    out_dir = Path(cfg.paths.output_dir)
    ckpt_dir = out_dir / "checkpoints"
    best = L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpt_dir, filename="best-{step}", monitor="val/exact_match",
                                               mode="max", save_last=True, auto_insert_metric_name=False,
                                               enable_version_counter=False)
    periodic = PeriodicCheckpoint(
        best, dirpath=ckpt_dir, save_top_k=0, save_last=True, enable_version_counter=False,
        train_time_interval=datetime.timedelta(minutes=float(cfg.checkpoint.every_minutes)))
    throughput = ThroughputMonitor(peak_flops=cfg.throughput.peak_flops)
    callbacks = [best, periodic, FinalValidation(), SaveOnTerminate(ckpt_dir / "last.ckpt"),
                 L.pytorch.callbacks.LearningRateMonitor(logging_interval="step"), throughput]
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger,
                                                 default_root_dir=str(out_dir))
    start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except SIGTERMException:
        if trainer.is_global_zero:
            print(f"\nstopped by SIGTERM at step {trainer.global_step}; saved {ckpt_dir / 'last.ckpt'}. Resume with "
                  f"ckpt_path={ckpt_dir / 'last.ckpt'}")
        raise SystemExit(143) from None  # 128 + SIGTERM: a stopped run is not a finished one

    fit_s = time.perf_counter() - start
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    summary = throughput.summary
    result = {"metrics": metrics, "global_step": trainer.global_step, "output_dir": str(out_dir),
              "last_ckpt": best.last_model_path, "best_ckpt": best.best_model_path, "wandb_dir": None,
              "throughput": summary.to_dict() if summary else None, "fit_seconds": fit_s}
    if trainer.is_global_zero:
        if isinstance(logger, L.pytorch.loggers.WandbLogger):
            result["wandb_dir"] = str(Path(logger.experiment.dir).parent)
            logger.experiment.finish()
        print(f"\nval/exact_match = {metrics.get('val/exact_match', float('nan')):.4f}   "
              f"val/loss = {metrics.get('val/loss', float('nan')):.4f}   global_step = {trainer.global_step}")
        if summary:
            print(f"throughput:  {summary.line()}")
        print(f"fit:         {fit_s:.1f} s for {trainer.global_step} steps (validation and checkpoints included)")
        print(f"checkpoint:  {best.last_model_path}  (best: {best.best_model_path})")
        if result["wandb_dir"]:
            print(f"W&B run:     {result['wandb_dir']}  (offline: `wandb sync {result['wandb_dir']}` uploads it)")
    return result
