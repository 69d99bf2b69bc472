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
    small_train_overrides, train_tokenizer, tree_digest, write_gpt2
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
          "do not match the hash in model.json", "re-export (`python export.py`)")


def test_an_edited_model_json_is_refused(copy_of, capsys):
    manifest = json.loads((copy_of / MANIFEST_FILE).read_text())
    manifest["model_config"]["n_layer"] += 1
    (copy_of / MANIFEST_FILE).write_text(json.dumps(manifest))
    fails(_infer(copy_of, "backend=torch"), capsys, "field(s) model_config.n_layer changed after export", "re-export")
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
    for seed in range(16):  # damaged bytes reach torch's unpickler, which raises a different error for each
        (tmp_path / "random.ckpt").write_bytes(np.random.default_rng(seed).bytes(4096))
        err = fails(_export(f"ckpt={tmp_path}/random.ckpt"), capsys,
                    "random.ckpt: cannot be read as a PyTorch checkpoint")
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
    proc = subprocess.run([sys.executable, str(ROOT / "infer.py"), f"artifacts={exported}", "limit=2", "show=1",
                           "backend=onnxruntime"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
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


# ---------------------------------------------------------------- everything a backend reads is verified
def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


@pytest.mark.parametrize("field,edit", [
    ("model_config.n_head", lambda m: m["model_config"].update(n_head=2)),  # decoded at exact match 0.33
    ("model_config.layer_norm_epsilon", lambda m: m["model_config"].update(layer_norm_epsilon=1.0)),  # spaces
    ("tokenizer.eos_id", lambda m: m["tokenizer"].update(eos_id=32)),
    ("data.digits_per_sample", lambda m: m["data"].update(digits_per_sample=3)),
    ("limits.max_cache", lambda m: m["limits"].update(max_cache=64)),
    ("capacity_buckets", lambda m: m.update(capacity_buckets=[32])),
    ("files.parity.json", lambda m: m["files"].pop("parity.json")),
])
def test_an_edited_manifest_field_is_named(copy_of, capsys, field, edit):
    _edit_json(copy_of / MANIFEST_FILE, edit)
    before = tree_digest(copy_of)
    fails(_infer(copy_of, "backend=torch", "limit=2"), capsys, f"model.json: field(s) {field} changed after export",
          "re-export")
    assert tree_digest(copy_of) == before  # a refused load writes nothing


@pytest.mark.parametrize("name,damage", [
    ("prefill.onnx", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])),  # truncated
    ("decode.onnx", lambda p: p.write_bytes(p.read_bytes()[:-1] + bytes([p.read_bytes()[-1] ^ 1]))),  # same size
    ("hf/tokenizer.json", lambda p: p.write_text(p.read_text().replace('"merges"', '"merges" ', 1))),
    ("parity.json", lambda p: p.unlink()),
])
def test_every_file_of_the_export_is_verified(copy_of, capsys, name, damage):
    damage(copy_of / name)
    fails(_infer(copy_of, "limit=2"), capsys, f"{copy_of / name}:", "re-export")


def test_a_graph_from_another_export_is_refused(copy_of, capsys):
    """prefill.onnx swapped for a graph another export wrote (here: the same file's neighbour, decode.onnx)."""
    shutil.copy(copy_of / "decode.onnx", copy_of / "prefill.onnx")
    fails(_infer(copy_of, "limit=2"), capsys, "prefill.onnx:", "re-export")


def test_engines_built_later_do_not_break_the_seal(copy_of):
    """Engines and their record are written into the directory after export: the export stays valid (negative
    control for the checks above: an untouched copy, plus an engine, decodes)."""
    from mmgpt.contract.artifacts import Artifacts
    from mmgpt.contract.engines import EngineBuild, EngineConfig, EngineFile
    (copy_of / "shared.engine").write_bytes(b"plan")
    artifacts = Artifacts.open(copy_of)
    artifacts.record_engines("shared", EngineBuild(
        strategy="shared", runtime="tensorrt", version="10.99.fake",
        weights_sha256_tree=artifacts.manifest.weights.sha256_tree, target="stand-in", context_past_slots=0,
        config=EngineConfig.defaults(strategy="shared"),
        engines={"shared": EngineFile(file="shared.engine", bytes=4, source="context_generation", io={}, profiles={},
                                      builder_weights_bytes=None, build_s=0.0)}))
    assert "shared" in Artifacts.open(copy_of).manifest.engines  # the record reads back: the seal ignores it
    report = _infer(copy_of, "limit=2", "backend=onnxruntime")()
    assert report["samples"] == 2


def test_tokenizer_files_of_a_pretrained_directory(tmp_path, capsys):
    from mmgpt.tokenizer import load_hf_tokenizer
    train_tokenizer().save(str(tmp_path / "tokenizer.json"))
    assert load_hf_tokenizer(tmp_path).vocab_size > 256  # negative control
    (tmp_path / "tokenizer.json").write_bytes((tmp_path / "tokenizer.json").read_bytes()[:500])
    fails(lambda: load_hf_tokenizer(tmp_path), capsys, "tokenizer.json: not a readable Hugging Face tokenizer file")
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "vocab.json").write_text("[1, 2]")
    (tmp_path / "merges.txt").write_text("")
    fails(lambda: load_hf_tokenizer(tmp_path), capsys, "vocab.json + merges.txt: not a readable")


@pytest.mark.parametrize("content", ["[1, 2]", '"gpt2"', "null"])
def test_an_init_from_config_that_is_not_an_object(tmp_path, capsys, content):
    from mmgpt.hf import load_hf
    write_gpt2(tmp_path)
    (tmp_path / "config.json").write_text(content)
    fails(lambda: load_hf(tmp_path), capsys, "config.json: must hold a JSON object")


# ---------------------------------------------------------------- inputs, in the dtype that runs
@pytest.mark.parametrize("override,fragment", [
    ("sampling.temperature=nan", "sampling.temperature=nan must be 0 (greedy) or a finite number >= 0.001"),
    ("sampling.temperature=inf", "sampling.temperature=inf must be 0"),
    ("sampling.temperature=1e-300", "sampling.temperature=1e-300 must be 0"),
    ("sampling.temperature=-1", "sampling.temperature=-1 must be 0"),
    ("sampling.top_p=nan", "sampling.top_p=nan must lie in (0, 1]"),
    ("sampling.seed=18446744073709551616", "sampling.seed=18446744073709551616 must lie in [0, 2**63 - 1]"),
    ("sampling.seed=-1", "sampling.seed=-1 must lie in"),
    ("device=banana", "device='banana': use auto, cpu, cuda or cuda:<index>"),
])
def test_sampling_and_device_values(exported, capsys, override, fragment):
    fails(_infer(exported, override), capsys, fragment)


@pytest.mark.skipif(torch.cuda.is_available(), reason="device=cuda is valid on a machine with a CUDA GPU")
def test_device_cuda_without_a_gpu(exported, capsys):
    fails(_infer(exported, "device=cuda", "backend=torch"), capsys, "device=cuda: this machine", "device=cpu")


def test_sampling_at_the_floor_still_samples(exported):
    """Negative control: the smallest allowed temperature decodes like greedy would, no NaN bytes."""
    greedy = _infer(exported, "limit=4")()
    floor = _infer(exported, "limit=4", "sampling.temperature=0.001")()
    assert floor["texts"] == greedy["texts"] and all(t and "\x00" not in t for t in greedy["texts"])


@pytest.mark.parametrize("shape", [(4, 8, 0), (4, 0, 16)])
def test_features_with_an_empty_dim(exported, tmp_path, capsys, shape):
    np.savez(tmp_path / "e.npz", features=np.zeros(shape, np.float32), texts=np.array(["a"] * 4))
    fails(_infer(exported, f"input={tmp_path}/e.npz"), capsys, f"e.npz: features must have shape (N, P, F) with "
          f"every dim >= 1, got {shape}")


def test_features_that_overflow_the_dtype_that_runs(exported, tmp_path, capsys):
    np.savez(tmp_path / "big.npz", features=np.full((2, 8, 16), 1e39), texts=np.array(["a", "b"]))  # float64
    fails(_infer(exported, f"input={tmp_path}/big.npz"), capsys, "big.npz: features contain NaN or infinite values")
    from mmgpt.runtime.requests import check_features
    fp16_overflow = torch.full((1, 8, 16), 1e5)
    check_features(fp16_overflow, torch.float32)  # negative control: finite in float32
    fails(lambda: check_features(fp16_overflow, torch.float16), capsys, "features: NaN or infinite values in the "
          "model's dtype float16")


def test_generator_api_checks_prefix_and_token_ids(exported, capsys):
    from mmgpt.contract.artifacts import Artifacts
    from mmgpt.runtime.backends import open_backend
    from mmgpt.runtime.generator import Generator
    artifacts = Artifacts.open(exported)
    generator = Generator(open_backend("torch", artifacts), artifacts.tokenizer)
    prefix = torch.rand(2, 8, 16)
    bos = artifacts.tokenizer.bos_id
    assert len(generator.generate(prefix, [[bos], [bos, 65]], max_new_tokens=2).texts) == 2  # negative control
    vocab = artifacts.manifest.config.vocab_size
    fails(lambda: generator.generate(prefix, [[bos], [bos, vocab]], max_new_tokens=2), capsys,
          f"prompt 1 holds token id(s) [{vocab}] that are not integers in its modality's vocabulary [0, {vocab})")
    fails(lambda: generator.generate(prefix, [[-1], [bos]], max_new_tokens=2), capsys,
          "prompt 0 holds token id(s) [-1]")
    fails(lambda: generator.generate(prefix, [[1.5], [bos]], max_new_tokens=2), capsys, "[1.5]")
    nan_prefix = prefix.clone()
    nan_prefix[1, 3, 2] = float("nan")
    fails(lambda: generator.generate(nan_prefix), capsys, "image features: NaN or infinite values")


def test_capacity_buckets_must_hold_prefix_prompt_and_a_token(trained, tmp_path, capsys, monkeypatch):
    import mmgpt.export.pipeline as pipeline
    monkeypatch.setattr(pipeline, "trace", lambda *a, **k: pytest.fail("traced with buckets that cannot decode"))
    fails(_export(f"ckpt={trained['last_ckpt']}", f"output_root={tmp_path}", "name=x", "capacity_buckets=[4,64]"),
          capsys, "capacity_buckets=[4, 64]: [4] cannot hold the context (8 positions) + a prompt token + one "
          "generated token = 10")
    assert list(tmp_path.iterdir()) == []


def test_a_decompression_bomb_is_refused_before_decoding(exported, tmp_path, capsys):
    from PIL import Image
    Image.new("L", (5000, 5000)).save(tmp_path / "bomb.png")  # 25 M pixels in a few KiB
    Image.new("L", (8, 8)).save(tmp_path / "ok.png")
    fails(_infer(exported, f"input={tmp_path}/*.png"), capsys, "bomb.png: 5000x5000 pixels, more than the")


def test_image_names_with_brackets(exported, tmp_path, capsys):
    from PIL import Image
    for i in (1, 2):
        Image.new("L", (8, 8), color=255).save(tmp_path / f"scan[{i}].png")
    report = _infer(exported, f"input='{tmp_path}/scan[[]*.png'")()  # a glob, brackets escaped
    assert report["samples"] == 1 and "exact_match" not in report
    fails(_infer(exported, f"input='{tmp_path}/scan[1].png'"), capsys, "1 images, but the model reads 2 per sample")
    fails(_infer(exported, f"input='{tmp_path}/[nothing'"), capsys, "[nothing: no such file and no file matches it")


def test_a_jsonl_that_is_not_utf8_names_file_and_line(exported, tmp_path, capsys):
    row = json.dumps({"features": np.zeros((8, 16)).tolist(), "text": "a"}).encode()
    (tmp_path / "d.jsonl").write_bytes(row + b"\n" + row.replace(b'"a"', b'"\xff"') + b"\n")
    fails(_infer(exported, f"input={tmp_path}/d.jsonl"), capsys, "d.jsonl:2: not UTF-8 (byte 0xff")


def test_unlabelled_features_are_captioned_without_a_metric(exported, tmp_path):
    np.savez(tmp_path / "x.npz", features=np.random.default_rng(0).random((3, 8, 16), dtype=np.float32))
    report = _infer(exported, f"input={tmp_path}/x.npz")()
    assert report["samples"] == 3 and len(report["texts"]) == 3 and "exact_match" not in report
    np.savez(tmp_path / "y.npz", features=np.zeros((3, 8, 16), np.float32), texts=np.array(["a", "b", "c"]))
    assert _infer(exported, f"input={tmp_path}/y.npz")()["exact_match"] == 0.0  # with texts: the metric


# ---------------------------------------------------------------- strict configs
@pytest.mark.parametrize("command,overrides,fragment", [
    ("infer", ["+max_new_token=5"], "max_new_token (did you mean max_new_tokens?)"),
    ("train", ["+experiment=digits", "+lr=0.5"], "lr (did you mean optimizer.lr?)"),
    ("train", ["+experiment=digits", "+trainer.max_step=5"], "trainer.max_step (did you mean trainer.max_steps"),
    ("train", ["+experiment=digits", "+optimizer.betaz=[0.9,0.9]"], "optimizer.betaz (did you mean optimizer.betas"),
    ("train", ["+experiment=digits", "+module.warmup=5"], "module.warmup (did you mean module.warmup_steps"),
    ("export", ["+engine.strategie=shared"], "engine.strategie (did you mean engine.strategy"),
    ("train", ["+experiment=digits", "seed=9223372036854775808"], "seed=9223372036854775808 must be an integer in"),
    ("train", ["+experiment=digits", "+callbacks.lrm._target_=lightning.pytorch.callbacks.LearningRateMonitor",
               "+callbacks.lrm.logging_intervall=step"], "callbacks.lrm.logging_intervall (did you mean"),
    ("train", ["+experiment=digits", "+model.extra._target_=lightning.pytorch.callbacks.LearningRateMonitor"],
     "model.extra"),  # only a collection of instantiables (conf/callbacks/) takes a new member
])
def test_keys_no_code_reads_are_errors(capsys, command, overrides, fragment):
    from mmgpt.strict_config import check_config
    fails(lambda: check_config(compose_config(command, overrides), command, overrides), capsys, fragment)


@pytest.mark.parametrize("command,overrides", [
    ("train", ["+experiment=digits", "+trainer.detect_anomaly=true"]),  # a Trainer argument the files do not set
    ("train", ["+experiment=features", "data.path=/data.npz", "trainer=gpu"]),
    ("export", ["engine=tensorrt", "name=x"]),
    ("infer", ["sampling.temperature=0.5"]),
    ("train", ["+experiment=digits", "+callbacks.lrm._target_=lightning.pytorch.callbacks.LearningRateMonitor",
               "+callbacks.lrm.logging_interval=step"]),  # a new callback: run.py instantiates every member
])
def test_valid_configs_pass_the_strict_check(command, overrides):
    from mmgpt.strict_config import check_config
    check_config(compose_config(command, overrides), command, overrides)


def test_resuming_a_checkpoint_of_another_model(trained, capsys):
    from mmgpt.strict_config import check_config
    overrides = ["+experiment=digits", f"ckpt_path={trained['last_ckpt']}"]
    check_config(compose_config("train", overrides), "train", overrides)  # negative control: the same model
    overrides += ["model.n_layer=2", "model.n_embd=64"]
    fails(lambda: check_config(compose_config("train", overrides), "train", overrides), capsys,
          "holds another model: model.n_layer=4 there, 2 here, model.n_embd=128 there, 64 here")


def test_the_commands_check_their_config_first(tmp_path):
    """infer.py itself: a `+` key nothing reads exits 1 before any artifacts are looked for."""
    proc = subprocess.run([sys.executable, str(ROOT / "infer.py"), "+max_new_token=5", "artifacts=/nonexistent"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "error: config key(s) that no code reads: max_new_token (did you mean max_new_tokens?)" in proc.stderr
    assert "Traceback" not in proc.stderr and list(tmp_path.iterdir()) == []
