"""The LightningModule: the model's weighted loss over its modalities with a head; validation reports the loss and
how many greedy generations of the decoded modality are right (the data's score: exact match of a caption, a drawn
digit that a classifier recognises)."""
from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
from dataclasses import dataclass

import lightning as L
import torch

from mmgpt.contract.checkpoint import META_KEY, CheckpointMeta, Schedule
from mmgpt.contract.typed import build, conf_defaults
from mmgpt.errors import UserError
from mmgpt.model import MODALITY_TABLES, TEXT, GPTConfig, MultimodalGPT
from mmgpt.runtime.backends.torch_model import TorchBackend
from mmgpt.runtime.generator import Generator
from mmgpt.tokenizer import tokenizer_from_dict
from mmgpt.training.schedule import lr_factor_fn

log = logging.getLogger(__name__)
FREEZE = ("none", "lm")  # lm: only the modalities' own tables learn (LLaVA's first stage); the LM stays bit-identical


def _switch(value, auto: bool, name: str) -> bool:
    if value == "auto":
        return auto
    if isinstance(value, bool):
        return value
    raise UserError(f"module.{name}={value!r}: use auto, true or false")


@dataclass(frozen=True)
class ModuleConfig:
    """conf/train.yaml's `module:` section, whose comments say what each option does and which holds the defaults;
    checked when built."""
    warmup_steps: int
    min_lr_ratio: float
    max_new_tokens: int
    freeze: str  # none | lm
    lr_modalities: float | None
    lr_lm: float | None
    compile: bool | str
    cuda_graph: bool | str
    activation_checkpointing: bool
    fused_optimizer: bool | str

    @classmethod
    def from_dict(cls, raw: dict) -> "ModuleConfig":
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(raw) - set(names))
        if unknown:
            raise UserError(f"module.{unknown[0]}: no such option; the module's options are {names}")
        try:
            config = build(cls, raw, "module")
        except (KeyError, TypeError) as e:
            raise UserError(f"{e}; see conf/train.yaml's module section") from None
        if config.freeze not in FREEZE:
            raise UserError(f"module.freeze={config.freeze!r}: choose one of {FREEZE}")
        return config

    @classmethod
    def defaults(cls, **changes) -> "ModuleConfig":
        """conf/train.yaml's module section with `changes` applied: for code that runs without Hydra."""
        return cls.from_dict({**conf_defaults("train.yaml", "module"), **changes})


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
    """The model's loss; validation reports it and the data's score of greedy generations."""

    def __init__(self, model_config: dict, tokenizer: dict, config: ModuleConfig, optimizer=None,
                 context_lens: dict[str, int] | None = None, data_config: dict | None = None):
        super().__init__()
        self.config = config
        # plain values only, and not the tokenizer (a GPT-2 one is megabytes): the checkpoint's "mmgpt" entry
        # carries it, and loads with torch.load(weights_only=True)
        self.save_hyperparameters({"model_config": model_config, "context_lens": context_lens,
                                   "data_config": data_config, "module": dataclasses.asdict(config)})
        self.model = MultimodalGPT(GPTConfig.from_dict(model_config))
        self.model.activation_checkpointing = config.activation_checkpointing
        self.tokenizer = tokenizer_from_dict(tokenizer)
        self.context_lens, self.data_config = dict(context_lens or {}), data_config
        self.metric = "exact_match" if self.model.config.decoded == TEXT else "recognised"
        self.optimizer_factory = optimizer
        self._val_hits = self._val_total = 0
        self._val_generator: Generator | None = None
        self._train_loss = self._loss  # compiled in on_fit_start where module.compile says so
        self._cuda_graph = False
        self.validated_at_step = -1
        self._resumed_schedule = None  # (step, total steps) of the checkpoint this run resumes
        if config.freeze == "lm":
            for name, p in self.model.named_parameters():
                p.requires_grad_(name.startswith(MODALITY_TABLES))

    def _loss(self, context, input_ids, targets):
        # Only the loss leaves the compiled region: the full logits need not be kept as an output.
        return self.model(context, input_ids, targets)[1]

    def on_fit_start(self):
        self.compile_step(self.device, self.trainer.world_size)

    def compile_step(self, device: torch.device, world_size: int = 1) -> None:
        """The training loss compiled (and CUDA-graph replayed) as module.compile / module.cuda_graph say."""
        options = compile_options(self.config.compile, self.config.cuda_graph, device, world_size)
        self._train_loss = self._loss if options is None else torch.compile(self._loss, **options)
        self._cuda_graph = options is not None and options["mode"] == "reduce-overhead"
        log.info("training step: %s", "eager" if options is None else f"torch.compile, mode {options['mode']}")

    def step_loss(self, batch) -> torch.Tensor:
        """The loss of one training batch, as training_step computes it (the benchmarks time this)."""
        if self._cuda_graph:  # this step's replay may overwrite the previous step's graph outputs
            torch.compiler.cudagraph_mark_step_begin()
        return self._train_loss(batch["context"], batch["input_ids"], batch["targets"])

    def training_step(self, batch, batch_idx):
        loss = self.step_loss(batch)
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
        B = len(batch["references"])
        _, loss = self.model(batch["context"], batch["input_ids"], batch["targets"])
        self.log("val/loss", loss, prog_bar=True, batch_size=B, sync_dist=True)
        # Decoding in the parameters' own dtype (fp32 weights and KV cache, as export sees them), not autocast's bf16
        # weight copies of this step; a generator with CUDA graphs would also keep pointing at those freed copies.
        with torch.autocast(self.device.type, enabled=False):
            result = self._val_generator.generate(batch["context"], max_new_tokens=self.config.max_new_tokens)
        score = self.trainer.datamodule.score(self.model.config.decoded, result.sequences, result.texts,
                                              batch["references"])
        self._val_hits += sum(score)
        self._val_total += B

    def on_validation_epoch_end(self):
        counts = torch.tensor([self._val_hits, self._val_total], dtype=torch.float64, device=self.device)
        counts = self.all_gather(counts).reshape(-1, 2).sum(0)  # exact over every rank's samples
        self.log(f"val/{self.metric}", (counts[0] / counts[1].clamp(min=1)).item(), prog_bar=True, rank_zero_only=True)
        if not self.trainer.sanity_checking:
            self.validated_at_step = self.trainer.global_step

    def teardown(self, stage):
        self._val_generator = None  # its graphs point at this device's parameters; Lightning may move them after fit

    def parameter_groups(self) -> list[dict]:
        """AdamW groups: the modalities' own tables and the language model may learn at different rates; no decay on
        biases and norms; frozen parameters are left out (so weight decay cannot touch them either)."""
        groups = []
        for own, lr in ((True, self.config.lr_modalities), (False, self.config.lr_lm)):
            named = [(n, p) for n, p in self.model.named_parameters()
                     if p.requires_grad and n.startswith(MODALITY_TABLES) == own]
            for decay in (True, False):
                params = [p for n, p in named if (p.dim() >= 2) == decay]
                if params:
                    group = {"params": params, **({} if decay else {"weight_decay": 0.0})}
                    if lr is not None:
                        group["lr"] = lr
                    groups.append(group)
        return groups

    def configure_optimizers(self):
        opt, sched = self.make_optimizer(int(self.trainer.max_steps), self.trainer.strategy.root_device,
                                         self._has_grad_scaler())
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def make_optimizer(self, total_steps: int, device: torch.device, scaler: bool = False):
        """The optimizer over parameter_groups() and its per-step learning-rate schedule, as train.py runs them
        (the benchmarks build theirs here too)."""
        factory = self.optimizer_factory or functools.partial(torch.optim.AdamW, lr=1e-3)
        opt = factory(self.parameter_groups(), **self._fused_kwargs(factory, device.type == "cuda", scaler))
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor_fn(total_steps))

    def _has_grad_scaler(self) -> bool:
        return getattr(self.trainer.precision_plugin, "scaler", None) is not None

    def _fused_kwargs(self, factory, on_cuda: bool, scaler: bool) -> dict:
        """`fused=True` for the optimizer where module.fused_optimizer says so: auto = on a GPU without a gradient
        scaler (bf16 or fp32; fp16's scaler would hand a fused optimizer scaled gradients to clip), when the
        optimizer takes `fused` and optimizer.fused is not set: a few fused kernels per step, little host work."""
        target = getattr(factory, "func", factory)
        takes = "fused" in inspect.signature(target).parameters
        if not _switch(self.config.fused_optimizer, takes and on_cuda and not scaler, "fused_optimizer") \
                or "fused" in getattr(factory, "keywords", {}):
            return {}
        if not takes:
            raise UserError(f"module.fused_optimizer=true, but {getattr(target, '__name__', target)} takes no "
                            "`fused` argument; use module.fused_optimizer=auto or false")
        if scaler:
            raise UserError("module.fused_optimizer=true with a gradient scaler (precision 16-mixed): its gradient "
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
        return lr_factor_fn(total, self.config.warmup_steps, self.config.min_lr_ratio, self._resumed_schedule,
                            say=L.pytorch.utilities.rank_zero_info)

    def on_save_checkpoint(self, checkpoint):
        # Everything needed to rebuild the model without this repo's config files.
        meta = CheckpointMeta(model_config=self.model.config.to_dict(), tokenizer=self.tokenizer.to_dict(),
                              context_lens=self.context_lens, data=self.data_config,
                              schedule=Schedule(total_steps=int(self.trainer.max_steps)))
        checkpoint[META_KEY] = meta.to_dict()

    def on_load_checkpoint(self, checkpoint):
        meta = CheckpointMeta.of(checkpoint, "the checkpoint to resume")  # train() checked the file before fit
        self._resumed_schedule = (int(checkpoint["global_step"]), meta.schedule.total_steps)
