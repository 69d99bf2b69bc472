"""`train(cfg)`: the plain function train.py and the tests call, from a composed Hydra config.

From scratch (the model shape from conf/model/*.yaml, the byte-level tokenizer) or from a pretrained GPT-2
(`model.init_from=<Hugging Face directory>`: its shape, weights and tokenizer; the prefix encoder starts fresh).
Every run validates and saves at its last step, saves a resumable checkpoint every `checkpoint.every_minutes`, and
on SIGTERM saves one before it exits (conf/callbacks/).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import hydra
import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from mmgpt.checkpoint import load_checkpoint
from mmgpt.errors import UserError
from mmgpt.model import GPTConfig, modality_from_dict
from mmgpt.throughput import ThroughputMonitor
from mmgpt.tokenizer import check_tokenizer_fits
from mmgpt.training.callbacks import AtomicCheckpointIO, SaveOnTerminate
from mmgpt.training.module import ModuleConfig, MultimodalGPTModule
from mmgpt.training.schedule import check_resume


def check_train_config(cfg: DictConfig) -> ModuleConfig:
    """What the config can get wrong, before any data is read or any weight allocated. Returns the module's
    options, typed."""
    steps, every = cfg.trainer.get("max_steps"), cfg.trainer.get("val_check_interval")
    if not isinstance(steps, int) or steps < 1:
        raise UserError(f"trainer.max_steps={steps!r} must be a positive number of optimizer steps")
    if isinstance(every, (int, float)) and every <= 0:
        raise UserError(f"trainer.val_check_interval={every!r} must be > 0")
    minutes = cfg.checkpoint.every_minutes
    if not isinstance(minutes, (int, float)) or minutes <= 0:
        raise UserError(f"checkpoint.every_minutes={minutes!r} must be a positive number of minutes")
    module = ModuleConfig.from_dict(OmegaConf.to_container(cfg.module, resolve=True))
    if module.freeze != "none" and not cfg.model.get("init_from"):
        raise UserError(f"module.freeze={module.freeze} keeps the language model as it is, which only makes "
                        "sense for a pretrained one: set model.init_from=<a Hugging Face GPT-2 or Llama-family "
                        "directory>")
    if cfg.get("ckpt_path"):
        check_resume(cfg.ckpt_path, steps)
    return module


def model_modalities(cfg: DictConfig, datamodule) -> dict:
    """model.modalities / context / decoded as GPTConfig fields, each modality completed by the data (dims,
    vocabularies, end tokens); a modality the data does not provide is a UserError here, before any weight."""
    raw = OmegaConf.to_container(cfg.model, resolve=True)
    entries = raw.get("modalities") or []
    if not isinstance(entries, list) or not all(isinstance(m, dict) for m in entries):
        raise UserError("model.modalities must be a list of {name, kind, ...} entries (see conf/train.yaml)")
    modalities = [datamodule.fill(modality_from_dict(m)) for m in entries]
    return {"modalities": modalities, "context": raw.get("context", []), "decoded": raw.get("decoded")}


def load_pretrained(cfg: DictConfig, datamodule):
    """model.init_from, checked before any training: a Hugging Face GPT-2 or Llama-family directory (its config,
    weights and tokenizer; every other modality's tables sized for the data, fresh) or an mmgpt checkpoint (every
    weight, e.g. a first stage's; a fresh optimizer and schedule). None when training from scratch."""
    source = cfg.model.get("init_from")
    if not source:
        return None
    from mmgpt.hf import HFLanguageModel, load_hf
    modalities = model_modalities(cfg, datamodule)
    if Path(source).is_file():
        loaded = load_checkpoint(source)
        have = loaded.model.config
        want = GPTConfig(**{**have.to_dict(), **modalities})
        if (have.modalities, have.context, have.decoded) != (want.modalities, want.context, want.decoded):
            raise UserError(f"model.init_from={source} has modalities {[m.name for m in have.modalities]} (context "
                            f"{have.context}, decoded {have.decoded}) of other sizes or roles than this run's "
                            "model.modalities with this data; use the same modalities, or a Hugging Face directory")
        return HFLanguageModel(have, loaded.model.state_dict(), loaded.tokenizer)
    free = {k: cfg.model[k] for k in ("dropout",) if k in cfg.model}
    return load_hf(source, **modalities, **free)


def build_module(cfg: DictConfig, datamodule, pretrained=None) -> MultimodalGPTModule:
    """The model config, tokenizer and initial weights: from conf/model/ or from a pretrained Hugging Face model."""
    common = dict(config=ModuleConfig.from_dict(OmegaConf.to_container(cfg.module, resolve=True)),
                  optimizer=instantiate(cfg.optimizer), context_lens=datamodule.context_lens,
                  data_config=OmegaConf.to_container(cfg.data, resolve=True))
    if pretrained is not None:
        from mmgpt.hf import load_language_model
        module = MultimodalGPTModule(model_config=pretrained.config.to_dict(),
                                     tokenizer=pretrained.tokenizer.to_dict(), **common)
        load_language_model(module.model, pretrained.state_dict)
        return module
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.pop("init_from", None)
    model_cfg.update(model_modalities(cfg, datamodule),
                     vocab_size=max(model_cfg.get("vocab_size", 0), datamodule.tokenizer.vocab_size))
    return MultimodalGPTModule(model_config=GPTConfig.from_dict(model_cfg).to_dict(),
                               tokenizer=datamodule.tokenizer.to_dict(), **common)


def instantiate(node, **kwargs):
    """hydra.utils.instantiate, with a bad value's own message instead of Hydra's wrapper around it."""
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except hydra.errors.InstantiationException as e:
        if isinstance(e.__cause__, UserError):
            raise e.__cause__ from None
        raise


def setup(cfg: DictConfig) -> tuple[MultimodalGPTModule, L.LightningDataModule]:
    """The module and data train.py runs, checked against each other; what the training benchmarks time too."""
    check_train_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    pretrained = load_pretrained(cfg, datamodule)
    if pretrained is not None:
        datamodule.tokenizer = pretrained.tokenizer
    module = build_module(cfg, datamodule, pretrained)
    config = module.model.config
    check_tokenizer_fits(datamodule.tokenizer, config)
    datamodule.model_config = config
    datamodule.setup("fit")
    if datamodule.max_positions > config.block_size:
        raise UserError(f"the longest context + decoded sequence ({datamodule.max_positions} positions) exceeds the "
                        f"model's {config.block_size} positions; raise model.block_size or shorten the data")
    return module, datamodule


def train(cfg: DictConfig) -> dict:
    """Train (and validate) from a composed config. Returns the final metrics and where things were written."""
    os.environ.setdefault("WANDB_MODE", "offline")  # no network needed; an explicit WANDB_MODE wins
    module, datamodule = setup(cfg)
    out_dir = Path(cfg.paths.output_dir)
    callbacks = [instantiate(node) for node in cfg.callbacks.values() if node is not None]
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger, plugins=[AtomicCheckpointIO()],
                                     default_root_dir=str(out_dir))
    best = trainer.checkpoint_callback  # the first ModelCheckpoint of conf/callbacks/
    terminate = next((c.path for c in callbacks if isinstance(c, SaveOnTerminate)), None)
    start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except SIGTERMException:
        if trainer.is_global_zero:
            saved = f"saved {terminate}. Resume with ckpt_path={terminate}" if terminate else \
                "nothing saved (no SaveOnTerminate callback configured)"
            print(f"\nstopped by SIGTERM at step {trainer.global_step}; {saved}")
        raise SystemExit(143) from None  # 128 + SIGTERM: a stopped run is not a finished one

    fit_s = time.perf_counter() - start
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    throughput = next((c for c in callbacks if isinstance(c, ThroughputMonitor)), None)
    summary = throughput.summary if throughput else None
    result = {"metrics": metrics, "global_step": trainer.global_step, "output_dir": str(out_dir),
              "last_ckpt": best.last_model_path if best else None, "best_ckpt": best.best_model_path if best else None,
              "wandb_dir": None, "throughput": summary.to_dict() if summary else None, "fit_seconds": fit_s}
    if trainer.is_global_zero:
        if isinstance(logger, L.pytorch.loggers.WandbLogger):
            result["wandb_dir"] = str(Path(logger.experiment.dir).parent)
            logger.experiment.finish()
        metric = f"val/{module.metric}"
        print(f"\n{metric} = {metrics.get(metric, float('nan')):.4f}   "
              f"val/loss = {metrics.get('val/loss', float('nan')):.4f}   global_step = {trainer.global_step}")
        if summary:
            print(f"throughput:  {summary.line()}")
        print(f"fit:         {fit_s:.1f} s for {trainer.global_step} steps (validation and checkpoints included)")
        print(f"checkpoint:  {result['last_ckpt']}  (best: {result['best_ckpt']})")
        if result["wandb_dir"]:
            print(f"W&B run:     {result['wandb_dir']}  (offline: `wandb sync {result['wandb_dir']}` uploads it)")
    return result
