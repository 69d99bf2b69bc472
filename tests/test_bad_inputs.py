"""Bad inputs a newcomer hits: each gives a message that names the input, what is wrong and what to do, exit
status 1, and leaves nothing half-written or misleading on disk. Silent wrong output is the worst class: a damaged
artifacts directory must never decode.

Most probes run the commands' own code in-process (`run_command`, what train.py / export.py / infer.py call);
a few run the scripts themselves to pin exit codes, signals and what lands on disk."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from helpers import ROOT, compose_config, export_command as _export, fails, infer_command as _infer, \
    small_train_overrides
from mmgpt.cli import run_command
from mmgpt.contract.artifacts import find_latest_artifacts
from mmgpt.contract.manifest import MANIFEST_FILE


@pytest.fixture
def copy_of(exported, tmp_path):
    path = tmp_path / "artifacts" / "digits"
    shutil.copytree(exported, path)
    return path


# ---------------------------------------------------------------- damaged artifacts never decode
@pytest.mark.parametrize("backend", ["onnxruntime", "torch", "torch-triton"])
def test_a_flipped_bit_in_weights_is_refused_by_every_backend(copy_of, capsys, backend):
    weights = copy_of / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x10
    weights.write_bytes(bytes(data))
    fails(_infer(copy_of, f"backend={backend}", "limit=2"), capsys, "weights.bin",
          "do not match the hash in model.json", "re-run `python export.py`")


def test_an_edited_model_json_is_refused(copy_of, capsys):
    manifest = json.loads((copy_of / MANIFEST_FILE).read_text())
    manifest["model_config"]["n_layer"] += 1
    (copy_of / MANIFEST_FILE).write_text(json.dumps(manifest))
    fails(_infer(copy_of, "backend=torch"), capsys, "does not describe the weights", "missing ['transformer.h.4")
    manifest["model_config"]["n_layer"] -= 1
    manifest["schema_version"] = 1
    (copy_of / MANIFEST_FILE).write_text(json.dumps(manifest))
    fails(_infer(copy_of), capsys, "written by another mmgpt version", "re-export")
    (copy_of / MANIFEST_FILE).write_text("{not json")
    fails(_infer(copy_of), capsys, "model.json: not valid JSON")


def test_nan_weights_are_refused_whatever_parity_enforce_says(trained, tmp_path, capsys):
    ckpt = torch.load(trained["last_ckpt"], weights_only=True)
    ckpt["state_dict"]["model.transformer.h.1.mlp.c_fc.weight"][3, 5] = float("nan")
    torch.save(ckpt, tmp_path / "nan.ckpt")
    fails(_export(f"ckpt={tmp_path}/nan.ckpt", f"output_root={tmp_path}/out", "parity.enforce=false"), capsys,
          "weight transformer.h.1.mlp.c_fc.weight holds 1 NaN or infinite value(s)",
          "whatever parity.enforce says")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ---------------------------------------------------------------- bad files and options
def test_bad_checkpoint_files(tmp_path, capsys):
    (tmp_path / "empty.ckpt").write_bytes(b"")
    fails(_export(f"ckpt={tmp_path}/empty.ckpt"), capsys, "empty.ckpt: empty file (0 bytes)")
    (tmp_path / "random.ckpt").write_bytes(os.urandom(4096))
    err = fails(_export(f"ckpt={tmp_path}/random.ckpt"), capsys, "random.ckpt: cannot be read as a PyTorch checkpoint")
    assert "weights_only" not in err  # torch's hint for pickles is no advice for a damaged file
    hf_dir = tmp_path / "gpt2"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text("{}")
    fails(_export(f"ckpt={hf_dir}"), capsys, "a directory, not a checkpoint file", "model.init_from=")


def test_resume_from_an_empty_checkpoint_fails_before_training(tmp_path, capsys):
    from mmgpt.training import train
    (tmp_path / "last.ckpt").write_bytes(b"")
    cfg = compose_config("train", ["+experiment=digits", *small_train_overrides(tmp_path / "run"),
                                   f"ckpt_path={tmp_path}/last.ckpt"])
    fails(lambda: train(cfg), capsys, "last.ckpt: empty file (0 bytes)")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override,fragment", [
    ("trainer.max_steps=0", "trainer.max_steps=0 must be a positive number of optimizer steps"),
    ("trainer.max_steps=-1", "trainer.max_steps=-1 must be a positive number"),
    ("data.batch_size=0", "data.batch_size=0 must be >= 1"),
    ("checkpoint.every_minutes=0", "checkpoint.every_minutes=0 must be a positive number"),
    ("module.freeze=lm", "module.freeze=lm keeps the language model"),
    ("module.fused_optimizer=sometimes", "module.fused_optimizer='sometimes': use auto, true or false"),
])
def test_training_options_are_checked(tmp_path, capsys, override, fragment):
    from mmgpt.training import train
    cfg = compose_config("train", ["+experiment=digits", *small_train_overrides(tmp_path), override])
    fails(lambda: train(cfg), capsys, fragment)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("override,fragment", [
    ("batch_size=0", "batch_size=0 must be an integer >= 1"),
    ("batch_size=-1", "batch_size=-1 must be an integer >= 1"),
    ("limit=0", "limit=0 must be an integer >= 1"),
    ("max_new_tokens=0", "max_new_tokens=0 must be an integer >= 1"),
    ("sampling.temperature=hot", "sampling.temperature='hot' must be a number"),
    ("sampling.top_p=0", "top_p=0 must lie in (0, 1]"),
    ("backend=tensorrt-llm", "backend='tensorrt-llm': choose one of"),
])
def test_infer_options_are_checked(exported, capsys, override, fragment):
    fails(_infer(exported, override), capsys, fragment)


def test_object_arrays_in_a_features_file(exported, tmp_path, capsys):
    np.savez(tmp_path / "obj.npz", features=np.array([np.zeros((8, 16)), np.zeros((3, 16))], dtype=object),
             texts=np.array(["a", "b"]))
    fails(_infer(exported, f"input={tmp_path}/obj.npz"), capsys, "obj.npz: array 'features' is stored as Python "
          "objects")


def test_engine_options_fail_before_any_tracing(trained, tmp_path, capsys, monkeypatch):
    pytest.importorskip("tensorrt_rtx")
    import mmgpt.export.pipeline as pipeline
    monkeypatch.setattr(pipeline, "trace", lambda *a, **k: pytest.fail("traced before checking engine options"))
    base = [f"ckpt={trained['last_ckpt']}", f"output_root={tmp_path}"]
    fails(_export(*base, "engine=tensorrt_rtx", "engine.strategy=bogus"), capsys, "engine.strategy='bogus'")
    fails(_export(*base, "engine=tensorrt_rtx", "engine.compute_capability=SM999"), capsys,
          "engine.compute_capability='SM999': TensorRT-RTX knows")
    fails(_export(*base, "dtype=fp8"), capsys, "dtype='fp8': choose one of")
    assert not any(tmp_path.iterdir())


def test_unwritable_output_root(trained, tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    fails(_export(f"ckpt={trained['last_ckpt']}", f"output_root={tmp_path}/file/artifacts", "parity.enabled=false"),
          capsys, "cannot write the artifacts under output_root=")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# ---------------------------------------------------------------- nothing half-written, nothing mistaken for an export
def test_leftovers_of_killed_exports_are_removed_and_never_picked(exported, trained, tmp_path, capsys):
    root = tmp_path / "artifacts"
    shutil.copytree(exported, root / "good")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    stale = root / f".newer.partial-{dead.pid}-abc"
    shutil.copytree(exported, stale)  # a complete-looking export, newer than "good"
    assert find_latest_artifacts(root) == root / "good"
    run_command(_export(f"ckpt={trained['last_ckpt']}", f"output_root={root}", "name=good", "parity.enabled=false",
                        "hf.enabled=false"))
    out = capsys.readouterr().out
    assert f"removed {stale}" in out and not stale.exists()
    assert sorted(p.name for p in root.iterdir()) == ["good"]
    assert oct((root / "good").stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_failed_replace_keeps_the_previous_export_and_no_partial(exported, trained, tmp_path, monkeypatch):
    import mmgpt.files as files
    root = tmp_path / "artifacts"
    shutil.copytree(exported, root / "x")
    before = (root / "x" / MANIFEST_FILE).read_text()
    real = os.replace

    def failing_replace(src, dst):
        if ".partial-" in str(src) and not str(src).endswith(".tmp") and ".old" not in str(src):
            raise OSError(28, "No space left on device", str(dst))
        return real(src, dst)
    monkeypatch.setattr(files.os, "replace", failing_replace)
    with pytest.raises(SystemExit):
        run_command(_export(f"ckpt={trained['last_ckpt']}", f"output_root={root}", "name=x", "parity.enabled=false"))
    assert sorted(p.name for p in root.iterdir()) == ["x"]
    assert (root / "x" / MANIFEST_FILE).read_text() == before


def test_infer_splits_batches_to_what_the_backend_takes(exported, monkeypatch):
    import mmgpt.inference as inference
    real = inference.open_backend

    def small_profile(*args, **kwargs):
        backend = real(*args, **kwargs)
        backend.max_batch = 3  # as an engine profile's max batch would
        return backend
    monkeypatch.setattr(inference, "open_backend", small_profile)
    report = _infer(exported, "limit=8", "batch_size=64")()
    assert report["batch_size"] == 3 and report["samples"] == 8


# ---------------------------------------------------------------- the real commands
def test_commands_exit_1_with_a_message_and_leave_no_run_directories(exported, tmp_path):
    """export.py and infer.py create no outputs/<command>/<time> directories; a bad input exits 1, no traceback."""
    env = {**os.environ, "WANDB_MODE": "offline"}
    weights = tmp_path / "a" / "weights.bin"
    shutil.copytree(exported, tmp_path / "a")
    weights.write_bytes(weights.read_bytes()[:-8] + b"\x00" * 8)
    proc = subprocess.run([sys.executable, str(ROOT / "infer.py"), f"artifacts={tmp_path / 'a'}"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "error:" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "do not match the hash in model.json" in proc.stderr
    proc = subprocess.run([sys.executable, str(ROOT / "infer.py"), f"artifacts={exported}", "limit=2", "show=1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"artifacts {exported}" in proc.stdout and "backend onnxruntime" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no outputs/, no log files


def test_sigterm_during_export_cleans_up_like_sigint(trained, tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "export.py"), f"ckpt={trained['last_ckpt']}",
                             f"output_root={tmp_path}", "name=x", "engine=none"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".x.partial-*")):
        time.sleep(0.2)
    assert list(tmp_path.glob(".x.partial-*")), "the export never started writing"
    time.sleep(2)  # inside the tracing
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out[-2000:]
    assert "terminated" in out
    assert list(tmp_path.iterdir()) == []
