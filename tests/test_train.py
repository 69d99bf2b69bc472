"""Training: every experiment composes and runs, resume continues the step count, DDP on 2 CPU processes."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import ROOT, compose_config, require, small_train_overrides, write_gpt2, write_llama
from mmgpt.checkpoint import CheckpointError, load_checkpoint
from mmgpt.training import train
from mmgpt.training.module import MultimodalGPTModule
from mmgpt.training.schedule import lr_factor_fn

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
# GPT-2-124M- and SmolLM2-135M-sized models on a CPU are the slow ones
EXPERIMENT_PARAMS = [pytest.param(e, marks=pytest.mark.slow) if e.endswith(("124m", "135m")) else e
                     for e in EXPERIMENTS]
PRETRAINED = {"gpt2_features": "gpt2_dir", "llama_features": "llama_dir"}  # experiment -> its init_from fixture


@pytest.fixture(scope="module")
def features_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("feat") / "features.npz"
    rng = np.random.default_rng(0)
    np.savez(path, features=rng.random((40, 6, 12)).astype(np.float32),
             texts=np.array([f"item {i % 7}" for i in range(40)]))
    return path


def pretrained_dir(tmp_path_factory, name: str, write) -> Path:
    """A tiny Hugging Face directory written by `write` (tests/helpers.py), as init_from takes it."""
    require("transformers", "transformers is not installed (pip install -e .[dev])")
    d = tmp_path_factory.mktemp(name)
    write(d)
    return d


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return pretrained_dir(tmp_path_factory, "gpt2", write_gpt2)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return pretrained_dir(tmp_path_factory, "llama", write_llama)


@pytest.mark.parametrize("experiment", EXPERIMENT_PARAMS)
def test_every_experiment_composes_and_runs_fast_dev_run(experiment, tmp_path, features_file, request):
    overrides = [f"+experiment={experiment}", *small_train_overrides(tmp_path), "trainer.fast_dev_run=true",
                 "data.val_samples=8", "module.max_new_tokens=4"]
    if "features" in experiment:
        overrides = [o for o in overrides if not o.startswith("data.val_samples")] + [f"data.path={features_file}"]
    if experiment in PRETRAINED:
        overrides.append(f"model.init_from={request.getfixturevalue(PRETRAINED[experiment])}")
    cfg = compose_config("train", overrides)
    result = train(cfg)
    assert result["global_step"] == 1
    assert np.isfinite(result["metrics"]["train/loss"]) and np.isfinite(result["metrics"]["val/loss"])
    metric = "val/recognised" if experiment == "digits_draw" else "val/exact_match"
    assert metric in result["metrics"]  # validation generated and scored (captions, or drawn digits)


def test_trained_model_learns_and_checkpoint_rebuilds_model(trained):
    assert trained["global_step"] == 300
    assert trained["metrics"]["val/exact_match"] >= 0.2  # 300 steps: far above chance (0.01 for 2 digits)
    loaded = load_checkpoint(trained["last_ckpt"])
    assert loaded.context_lens == {"image": 8} and loaded.tokenizer.eos_id == 257
    assert loaded.data_config["digits_per_sample"] == 2


def _logged_steps(out: Path) -> list[int]:
    rows = list(csv.DictReader(open(next(out.glob("csv/*/metrics.csv")))))
    return sorted({int(r["step"]) for r in rows if r.get("train/loss")})


def test_a_short_run_validates_and_saves_at_its_last_step(tmp_path):
    """val_check_interval beyond max_steps: still one validation, and last + best checkpoints, at the end."""
    result = train(compose_config("train", ["+experiment=digits", *small_train_overrides(tmp_path, steps=5),
                                            "trainer.val_check_interval=1000", "data.val_samples=8"]))
    assert result["global_step"] == 5
    assert {"val/exact_match", "val/loss"} <= set(result["metrics"])  # validation ran
    assert torch.load(result["last_ckpt"], weights_only=True)["global_step"] == 5
    assert Path(result["best_ckpt"]).name == "best-5.ckpt"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best-5.ckpt", "last.ckpt"]


@pytest.mark.parametrize("validate", [True, False])
def test_last_checkpoint_is_written_once_at_the_end(tmp_path, monkeypatch, validate):
    """The final validation writes last.ckpt; the periodic callback does not write it again at the end (a second
    write of a GPU model's checkpoint costs seconds). Without validation the periodic callback still writes it."""
    import lightning as L
    saved, real_save = [], L.Trainer.save_checkpoint

    def save(self, filepath, *args, **kwargs):
        saved.append((Path(filepath).name, self.global_step))
        return real_save(self, filepath, *args, **kwargs)
    monkeypatch.setattr(L.Trainer, "save_checkpoint", save)
    overrides = ["+experiment=digits", *small_train_overrides(tmp_path, steps=4), "data.val_samples=8"]
    result = train(compose_config("train", overrides + ([] if validate else ["+trainer.limit_val_batches=0"])))
    assert [s for s in saved if s[0] == "last.ckpt"] == [("last.ckpt", 4)]
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert (Path(result["best_ckpt"]).name == "best-4.ckpt") if validate else not result["best_ckpt"]


def test_resumed_schedule_continues_instead_of_jumping():
    """A 3,000-step run resumed with max_steps=6,000: the learning rate goes on from where it was."""
    said = []
    f = lr_factor_fn(6000, warmup_steps=100, min_lr_ratio=0.1, resumed=(3000, 3000), say=said.append)
    assert f(3000) == pytest.approx(0.1, abs=1e-9)  # the first run had decayed to its floor: no jump to 0.55
    assert f(2999) <= 0.1 + 1e-6 and f(6000) == pytest.approx(0.1)
    assert "continues from 0.1 x its peak and decays (cosine) to 0.1 x at step 6000" in said[0]
    g = lr_factor_fn(6000, warmup_steps=100, min_lr_ratio=0.1)
    assert g(0) == pytest.approx(0.01) and g(99) == pytest.approx(1.0) and g(3000) > 0.5  # the plain schedule


def test_short_run_logs_throughput_beside_the_loss_and_compiles_when_asked(tmp_path, monkeypatch):
    """module.compile=true goes through torch.compile (here with the aot_eager backend: Inductor's C++ build of
    even the tiny model takes ~40 s on 2 cores); tokens/s, step time and MFU (from a given peak) are logged on the
    loss's rows, and the summary counts the steps after warm-up."""
    compiled, real_compile = [], torch.compile

    def compile_on_cpu(fn, **options):
        compiled.append(options)
        return real_compile(fn, backend="aot_eager", dynamic=options["dynamic"])
    monkeypatch.setattr(torch, "compile", compile_on_cpu)
    result = train(compose_config("train", [
        "+experiment=digits", *small_train_overrides(tmp_path, steps=8), "trainer.log_every_n_steps=2",
        "data.val_samples=8", "module.compile=true", "throughput.peak_flops=1e12"]))
    assert compiled == [{"mode": "default", "dynamic": False}]  # no CUDA graphs off a GPU
    rows = list(csv.DictReader(open(next(tmp_path.glob("csv/*/metrics.csv")))))
    perf = [r for r in rows if r.get("perf/tokens_per_s")]
    assert [int(r["step"]) for r in perf] == [5, 7]  # the steps Lightning writes the loss at, after warm-up
    for r in perf:
        assert float(r["perf/tokens_per_s"]) > 0 and float(r["perf/step_ms"]) > 0 and float(r["perf/mfu"]) > 0
        assert r["train/loss"]
    summary = result["throughput"]
    assert summary["steps"] == 4  # 8 steps - 3 warm-up - the first timed step's start mark
    tokens_per_step = 8 * (8 + 20)  # batch x (image + longest training caption with BOS and EOS)
    assert summary["tokens_per_s"] == pytest.approx(tokens_per_step / (summary["step_ms"] / 1e3), rel=1e-6)
    assert 0 < summary["mfu"] < 1 and summary["peak_mem_gib"] is None


def test_fused_optimizer_clips_its_own_gradients_under_bf16(tmp_path, monkeypatch):
    """module.fused_optimizer=true under bf16 autocast (no gradient scaler): Lightning would refuse to clip for a
    fused optimizer; the module clips the true gradients itself, every step, to gradient_clip_val."""
    optimizers, clips, real_configure, real_clip = [], [], MultimodalGPTModule.configure_optimizers, \
        torch.nn.utils.clip_grad_norm_

    def configure(self):
        out = real_configure(self)
        optimizers.append(out["optimizer"])
        return out

    def clip(params, max_norm, *args, **kwargs):
        params = list(params)
        before = real_clip(params, max_norm, *args, **kwargs)
        after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        clips.append((max_norm, float(before), float(after)))
        return before
    monkeypatch.setattr(MultimodalGPTModule, "configure_optimizers", configure)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    result = train(compose_config("train", [
        "+experiment=digits", *small_train_overrides(tmp_path, steps=3), "trainer.precision=bf16-mixed",
        "trainer.gradient_clip_val=0.05", "module.fused_optimizer=true", "data.val_samples=8"]))
    assert result["global_step"] == 3 and np.isfinite(result["metrics"]["train/loss"])
    assert all(g["fused"] is True for g in optimizers[0].param_groups)
    assert len(clips) == 3
    for max_norm, before, after in clips:
        assert max_norm == 0.05 and before > 0.05 and after == pytest.approx(0.05, rel=1e-3)


def test_resume_continues_global_step(tmp_path):
    first = train(compose_config("train", ["+experiment=digits", *small_train_overrides(tmp_path / "a", steps=6),
                                           "trainer.log_every_n_steps=1", "data.val_samples=8"]))
    assert first["global_step"] == 6
    assert torch.load(first["last_ckpt"], weights_only=True)["global_step"] == 6
    second = train(compose_config("train", [
        "+experiment=digits", *small_train_overrides(tmp_path / "b", steps=12), "trainer.log_every_n_steps=1",
        "trainer.val_check_interval=6", "data.val_samples=8", f"ckpt_path={first['last_ckpt']}"]))
    assert second["global_step"] == 12
    assert min(_logged_steps(tmp_path / "b")) >= 6  # the second run started where the first stopped


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    """Lightning's own DDP through the user's entry point: 2 CPU processes, gradients all-reduced."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "train.py", "+experiment=digits", "trainer=ddp", "trainer.accelerator=cpu",
           "trainer.devices=2", "trainer.max_steps=4", "trainer.val_check_interval=4", "logger=csv",
           "trainer.enable_progress_bar=false", "data.batch_size=8", "data.val_samples=16",
           f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "global_step = 4" in proc.stdout
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stdout + proc.stderr
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_unknown_experiment_lists_available():
    proc = subprocess.run([sys.executable, "train.py", "+experiment=nonexistent"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert "Could not find 'experiment/nonexistent'" in proc.stderr
    assert "Available options in 'experiment'" in proc.stderr
    for name in EXPERIMENTS:
        assert name in proc.stderr


def test_wandb_offline_by_default(tmp_path):
    require("wandb", "wandb is not installed (pip install -e .[train])")
    os.environ.pop("WANDB_MODE", None)
    try:
        cfg = compose_config("train", ["+experiment=digits", *small_train_overrides(tmp_path), "logger=wandb",
                                       "data.val_samples=8"])
        result = train(cfg)
    finally:
        os.environ["WANDB_MODE"] = "offline"
    assert result["wandb_dir"] is not None and "offline-run" in result["wandb_dir"]
    assert Path(result["wandb_dir"]).is_dir()


def test_bad_checkpoints_get_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.ckpt")
    (tmp_path / "corrupt.ckpt").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="cannot be read as a PyTorch checkpoint"):
        load_checkpoint(tmp_path / "corrupt.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="not an mmgpt checkpoint"):
        load_checkpoint(tmp_path / "other.ckpt")


@pytest.mark.slow
def test_sigterm_mid_run_saves_and_the_resumed_run_ends_at_max_steps(tmp_path):
    """train.py SIGTERMed after step 3 of 8 saves last.ckpt there and exits 143; resuming from it ends at step 8,
    the step count an uninterrupted run reaches; resuming from that final checkpoint is refused (nothing to do)."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT / "tests")}
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "train.py", "+experiment=digits", *small_train_overrides(run, steps=8),
                           "data.val_samples=8", "+callbacks.sigterm._target_=sigterm_callback.SigtermAt",
                           "+callbacks.sigterm.step=3", f"hydra.run.dir={tmp_path / 'hydra'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "stopped by SIGTERM at step 3" in proc.stdout
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    resumed = train(compose_config("train", ["+experiment=digits", *small_train_overrides(tmp_path / "resumed", 8),
                                             "data.val_samples=8", f"ckpt_path={last}"]))
    assert resumed["global_step"] == 8
    assert torch.load(resumed["last_ckpt"], weights_only=True)["global_step"] == 8
    with pytest.raises(CheckpointError, match=r"is at step 8; trainer.max_steps=8 leaves nothing to train"):
        train(compose_config("train", ["+experiment=digits", *small_train_overrides(tmp_path / "again", 8),
                                       f"ckpt_path={resumed['last_ckpt']}"]))


def test_a_failed_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    """The checkpoint writer replaces a file only with a complete one: a write that fails part-way (a full disk, a
    crash) leaves the previous checkpoint readable and no temporary file behind."""
    from mmgpt.training.callbacks import AtomicCheckpointIO
    io, path = AtomicCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 1  # negative control: a write that succeeds

    class Unwritable:
        def __reduce__(self):
            raise OSError(28, "No space left on device")
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"global_step": 2, "w": torch.ones(3), "later": Unwritable()}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]
    real_write = Path.write_bytes

    def write_half(self, data):
        real_write(self, bytes(data[: len(data) // 2]))
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Path, "write_bytes", write_half)  # the disk fills while the new file is being written
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"global_step": 3, "w": torch.ones(1000)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]
