"""Training throughput: tokens/s, step time and MFU in the logs and the progress bar, without a host sync per step.

MFU follows nanoGPT: a training step costs 6 N FLOPs per token for the weights (forward 2N, backward 4N) plus
12 L H Dh T for attention over a sequence of T positions (the context included), against the GPU's dense bf16
peak. Tokens are sequence positions, context included: B (context + T) per step. Activation checkpointing's recompute is
not counted (this is model FLOPs utilisation, not hardware FLOPs utilisation).
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import lightning as L
import torch

from mmgpt.model import MultimodalGPT

log = logging.getLogger(__name__)

# Dense bf16 tensor-core FLOP/s per GPU from the vendor's datasheets; the first name contained in the device name
# wins, so the more specific names come first. MFU is reported against this peak whatever the training precision.
PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
)


def matmul_params(model: MultimodalGPT) -> int:
    """N of the 6N term: every parameter except GPT-2's position table and the modalities' own embedding tables,
    and except the token table when it is not also the output head (a table lookup costs no FLOPs; a tied table
    does the head's matmul)."""
    n = model.num_params() - sum(p.numel() for p in model.embeddings.parameters())
    if model.config.family == "gpt2":
        n -= model.transformer.wpe.weight.numel()
    if not model.config.tie_weights:
        n -= model.token_embedding.weight.numel()
    return n


def flops_per_token(n_params: int, n_layer: int, n_head: int, head_dim: int, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward) of a sequence of seq_len positions, nanoGPT's estimate."""
    return 6 * n_params + 12 * n_layer * n_head * head_dim * seq_len


def mfu(tokens_per_s: float, flops_per_tok: float, peak_flops: float | None) -> float | None:
    """Achieved over peak FLOP/s, or None where the peak is unknown (a CPU, an unlisted GPU)."""
    return None if not peak_flops else tokens_per_s * flops_per_tok / peak_flops


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def peak_flops_for(name: str) -> float | None:
    """The table's peak for a device name such as "NVIDIA H100 80GB HBM3"; None for a CPU or an unlisted GPU."""
    return next((peak for key, peak in PEAK_FLOPS if key in name), None)


@dataclass
class ThroughputSummary:
    steps: int  # timed steps: after warm-up, validation excluded
    step_ms: float
    tokens_per_s: float  # all processes together
    mfu: float | None  # per device
    peak_mem_gib: float | None  # this process's peak allocated memory over the fit
    first_step_s: float  # the first step alone: compilation and CUDA-graph warm-up show here
    peak_flops: float | None

    def line(self) -> str:
        mfu_text = (f"{100 * self.mfu:.1f}%" if self.mfu is not None
                    else "n/a (no peak FLOP/s for this device: set throughput.peak_flops)")
        mem = f"{self.peak_mem_gib:.2f} GiB" if self.peak_mem_gib is not None else "n/a"
        return (f"{self.step_ms:.2f} ms/step  {self.tokens_per_s:,.0f} tok/s  MFU {mfu_text}  peak memory {mem}  "
                f"(mean of {self.steps} steps; first step {self.first_step_s:.1f} s)")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Mark:
    """A point between two training steps: cumulative work so far, and when the GPU (or the CPU) got there."""
    step: int
    tokens: int
    flops: float
    loss: torch.Tensor | None  # pinned host copy on a GPU, filled by the time `event` completes
    event: torch.cuda.Event | None
    wall: float

    def ready(self) -> bool:
        return self.event is None or self.event.query()


class ThroughputMonitor(L.Callback):
    """Every `log_every_n_steps` steps, logs `perf/step_ms`, `perf/tokens_per_s`, `perf/mfu` and shows them with the
    loss in the progress bar; the summary after fit adds peak memory.

    On a GPU each interval is timed with CUDA events and read only once the GPU has passed its end, so the numbers
    trail by about one interval and no training step waits for the device (the first one aside: its time, the
    compilation, is reported once). The first `warmup_steps` steps (compilation, CUDA-graph recording) and
    validation are left out of the timing.
    """

    def __init__(self, peak_flops: float | None = None, warmup_steps: int = 3):
        self.peak_flops_override, self.warmup_steps = peak_flops, warmup_steps
        self.summary: ThroughputSummary | None = None

    def on_fit_start(self, trainer, pl_module):
        self.device = pl_module.device
        self.peak_flops = self.peak_flops_override or peak_flops_for(device_name(self.device))
        self.interval = trainer.log_every_n_steps or 50
        self.world = trainer.world_size
        c = pl_module.model.config
        self.shape = (matmul_params(pl_module.model), c.n_layer, c.n_head, c.head_dim)
        self.tokens, self.flops = 0, 0.0  # this process, since fit start
        self.timed = {"steps": 0, "tokens": 0, "flops": 0.0, "seconds": 0.0}
        self.marks: list[_Mark] = []
        self.skip = self.warmup_steps
        self.first_step_s = None
        self.summary = None
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.first_step_s is None:
            self._sync()  # once per fit: the first step's time is the compile time the user waits for
            self.first_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        B, T = batch["input_ids"].shape
        N = T + sum((c if torch.is_tensor(c) else c[0]).shape[1] for c in batch["context"].values())
        self.tokens += B * N
        self.flops += B * N * flops_per_token(*self.shape, N)
        if self.first_step_s is None:
            self._sync()
            self.first_step_s = time.perf_counter() - self.first_start
            log.info("first training step: %.1f s (compilation and CUDA-graph warm-up show here)", self.first_step_s)
        if self.skip > 0:
            self.skip -= 1
            return
        step = trainer.global_step
        if self.marks and step == self.marks[-1].step:  # gradient accumulation: the optimizer has not stepped
            return
        if not self.marks or step % self.interval == 0:  # the first mark after a (re)start is the anchor
            self.marks.append(self._mark(step, outputs))
            if self._resolve(trainer) and step % self.interval == 0:
                self._publish(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        self._resolve(trainer, wait=True)  # validation waits for the device anyway
        self.marks = []  # the next interval starts after validation
        self.skip = 0

    def on_train_end(self, trainer, pl_module):
        self._resolve(trainer, wait=True)
        t = self.timed
        if t["steps"] == 0:
            log.info("too few training steps after warm-up to time (%d warm-up steps)", self.warmup_steps)
            return
        seconds = t["seconds"]
        peak_mem = (torch.cuda.max_memory_allocated(self.device) / 2**30) if self.device.type == "cuda" else None
        self.summary = ThroughputSummary(
            steps=t["steps"], step_ms=1e3 * seconds / t["steps"], tokens_per_s=self.world * t["tokens"] / seconds,
            mfu=mfu(t["tokens"] / seconds, t["flops"] / t["tokens"], self.peak_flops), peak_mem_gib=peak_mem,
            first_step_s=self.first_step_s, peak_flops=self.peak_flops)
        log.info("throughput: %s", self.summary.line())

    # ------------------------------------------------------------------------------------------------------------
    def _mark(self, step: int, outputs) -> _Mark:
        loss = outputs["loss"].detach().float() if isinstance(outputs, dict) and "loss" in outputs else None
        if self.device.type != "cuda":
            return _Mark(step, self.tokens, self.flops, loss, None, time.perf_counter())
        host = None
        if loss is not None:  # copied behind the step's work; read once the event below has completed
            host = torch.empty((), dtype=torch.float32, pin_memory=True)
            host.copy_(loss, non_blocking=True)
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return _Mark(step, self.tokens, self.flops, host, event, time.perf_counter())

    def _resolve(self, trainer, wait: bool = False) -> bool:
        """Fold every finished interval into the totals; True if at least one was new."""
        new = False
        while len(self.marks) >= 2 and (wait or self.marks[1].ready()):
            a, b = self.marks[0], self.marks[1]
            if b.event is not None:
                b.event.synchronize()
                seconds = a.event.elapsed_time(b.event) / 1e3
            else:
                seconds = b.wall - a.wall
            steps, tokens, flops = b.step - a.step, b.tokens - a.tokens, b.flops - a.flops
            for key, value in (("steps", steps), ("tokens", tokens), ("flops", flops), ("seconds", seconds)):
                self.timed[key] += value
            self.latest = {"perf/step_ms": 1e3 * seconds / steps, "perf/tokens_per_s": self.world * tokens / seconds}
            achieved = mfu(tokens / seconds, flops / tokens, self.peak_flops)
            if achieved is not None:
                self.latest["perf/mfu"] = achieved
            progress = {"tok/s": f"{self.latest['perf/tokens_per_s']:,.0f}",
                        "step_ms": round(self.latest["perf/step_ms"], 2)}
            if achieved is not None:
                progress["mfu"] = f"{100 * achieved:.1f}%"
            if b.loss is not None:
                progress["loss"] = round(float(b.loss), 4)
            # Plain floats into the bar's dict: a tensor logged with prog_bar=True is converted (a sync) every step.
            trainer.progress_bar_metrics.update(progress)
            self.marks.pop(0)
            new = True
        return new

    def _publish(self, trainer, pl_module):
        # CPU tensors: logging a Python float would copy it to the device, and that copy waits for the queue.
        pl_module.log_dict({k: torch.tensor(v) for k, v in self.latest.items()}, on_step=True, on_epoch=False,
                           batch_size=1)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
