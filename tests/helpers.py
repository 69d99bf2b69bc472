"""What several test files share: composing Hydra configs, shrinking experiments to CPU seconds, tiny Hugging Face
GPT-2 directories."""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import pytest
import torch

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
# Where the fused-kernel tests put their tensors: the GPU when there is one (kernels compiled, as users run them),
# else the CPU (Triton's interpreter; tests/conftest.py sets TRITON_INTERPRET only then).
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 tl.dot on a GPU rounds its inputs to TF32 (10-bit mantissa); the interpreter computes in full fp32
KERNEL_RTOL = 2e-3 if KERNEL_DEVICE == "cuda" else 1e-5


def require(module: str, reason: str):
    """The module, or a skip naming why; in CI (CI is set) a missing module fails instead: setup.sh installs every
    extra the tests use, so a skip there would hide a broken install."""
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=reason)


def compose_config(name: str, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def fails(fn, capsys, *fragments):
    """fn, run as a command, ends with exit status 1 and a message holding every fragment (not a traceback)."""
    import pytest
    from mmgpt.cli import run_command
    with pytest.raises(SystemExit) as exit_info:
        run_command(fn)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1, err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in: {err}"
    assert "Traceback" not in err
    return err


def infer_command(artifacts, *extra):
    from mmgpt.inference import infer
    return lambda: infer(compose_config("infer", [f"artifacts={artifacts}", "show=0", *extra]))


def export_command(*overrides):
    from mmgpt.export.pipeline import export
    return lambda: export(compose_config("export", ["engine=none", *overrides]))


def tree_digest(directory) -> dict[str, str]:
    """relative path -> sha256 of every file under `directory`: equal digests mean byte-identical trees."""
    import hashlib
    directory = Path(directory)
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def small_train_overrides(out: Path, steps: int = 4) -> list[str]:
    """Shrink any experiment to seconds on a CPU."""
    return [f"paths.output_dir={out}", "logger=csv", "trainer.accelerator=cpu", "trainer.devices=1",
            "trainer.precision=32-true", f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
            "trainer.enable_progress_bar=false", "data.batch_size=8"]


# ---------------------------------------------------------------- tiny Hugging Face GPT-2 directories
SENTENCES = ["the quick brown fox jumps over the lazy dog", "a digit seven, then a four and a nine",
             "héllo wörld, 日本語のテキスト 🙂 and more emoji 🚀", "captions are short; the prefix carries the image"]
EOT = "<|endoftext|>"


def train_tokenizer(vocab_size=320, special=EOT):
    """A byte-level BPE trained on a few sentences; the end-of-text token comes last, as in GPT-2."""
    from tokenizers import ByteLevelBPETokenizer
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(SENTENCES * 4, vocab_size=vocab_size, min_frequency=1, show_progress=False)
    if special:
        bpe.add_special_tokens([special])
    return bpe


def write_gpt2(directory, activation="gelu_new", tokenizer_files="json", seed=0, **overrides):
    """A tiny random GPT-2 saved by transformers, with the tokenizer in it. Weights are drawn wider than GPT-2's
    init so that logits are far apart and greedy choices are not near-ties."""
    directory.mkdir(parents=True, exist_ok=True)
    bpe = train_tokenizer()
    if tokenizer_files == "json":
        bpe.save(str(directory / "tokenizer.json"))
    elif tokenizer_files == "vocab+merges":  # as GPT-2's own vocab.json: the end-of-text token included
        bpe.save_model(str(directory))
        (directory / "vocab.json").write_text(json.dumps(bpe.get_vocab()))
    eot = bpe.token_to_id(EOT)
    cfg = dict(vocab_size=bpe.get_vocab_size(), n_positions=64, n_embd=32, n_layer=2, n_head=2,
               activation_function=activation, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
               initializer_range=0.3, bos_token_id=eot, eos_token_id=eot)
    cfg.update(overrides)
    import torch
    import transformers
    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg)).eval()
    hf.save_pretrained(directory)
    return hf
