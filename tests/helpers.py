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


# ---------------------------------------------------------------- tiny Hugging Face Llama-family directories
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}
# The three acceptance shapes in miniature: Llama 3 (RoPE scaling, GQA), Qwen2 (q/k/v biases), SmolLM2 (tied).
LLAMA_KINDS = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(num_key_value_heads=2, rope_theta=500000.0,
                                                     rope_scaling=LLAMA3_SCALING, tie_word_embeddings=False)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(num_key_value_heads=2, rope_theta=1000000.0,
                                                     tie_word_embeddings=False)),
    "smollm2": ("LlamaForCausalLM", "LlamaConfig", dict(num_key_value_heads=4, rope_theta=100000.0,
                                                       tie_word_embeddings=True)),
}


def write_llama(directory, kind="llama", seed=0, **overrides):
    """A tiny random Llama-family model saved by transformers (kind: LLAMA_KINDS), with a tokenizer whose BOS and
    EOS are distinct named tokens, as Llama 3's are. Weights drawn wider than the usual init (see write_gpt2)."""
    import transformers
    directory.mkdir(parents=True, exist_ok=True)
    bpe = train_tokenizer(special=None)
    bpe.add_special_tokens([BOS, EOS])
    bpe.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS}))
    architecture, config_class, fields = LLAMA_KINDS[kind]
    cfg = dict(vocab_size=bpe.get_vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5, initializer_range=0.2,
               bos_token_id=bpe.token_to_id(BOS), eos_token_id=bpe.token_to_id(EOS), **fields)
    cfg.update(overrides)
    torch.manual_seed(seed)
    hf = getattr(transformers, architecture)(getattr(transformers, config_class)(**cfg)).eval()
    if kind == "qwen2":  # transformers initialises biases at zero: make them matter
        for name, p in hf.named_parameters():
            if name.endswith("proj.bias"):
                torch.nn.init.normal_(p, std=0.2)
    hf.save_pretrained(directory)
    return hf


def greedy_ours_and_hf(model, tok, directory, prefix_dim: int, new: int = 10):
    """Greedy tokens (B, new) of mmgpt's generator and of transformers' generate(inputs_embeds=...) on the same
    ragged batch with a 4-element image. HF runs from the directory save_hf writes into `directory`, the image
    through modalities.json's function: what a serving stack would do. HF generates a batch left-padded (it
    derives positions from the attention mask); mmgpt's generator right-pads."""
    import transformers
    from mmgpt.hf import load_modality_tables, save_hf
    from mmgpt.runtime.backends.torch_model import TorchBackend
    from mmgpt.runtime.generator import Generator
    save_hf(model, tok, directory)
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    tables = load_modality_tables(directory)
    P = 4
    prefix = torch.randn(3, P, prefix_dim, generator=torch.Generator().manual_seed(2))
    prompts = [tok.encode("the quick"), [tok.bos_id], tok.encode("héllo")]
    gen = Generator(TorchBackend(model), tok, max_positions=64, eos_check_interval=new + 1)
    ours = gen.generate(prefix, prompts, max_new_tokens=new).tokens
    T = max(len(p) for p in prompts)
    embeds, mask = [], []
    with torch.no_grad():
        for row, p in zip(prefix, prompts):
            pad = T - len(p)
            embeds.append(torch.cat([torch.zeros(pad, model.config.n_embd), tables.embed("image", row),
                                     hf.get_input_embeddings()(torch.tensor(p))]))
            mask.append([0] * pad + [1] * (P + len(p)))
        theirs = hf.generate(inputs_embeds=torch.stack(embeds), attention_mask=torch.tensor(mask), do_sample=False,
                             max_new_tokens=new, min_new_tokens=new, eos_token_id=None, pad_token_id=tok.pad_id)
    return ours, theirs


def write_features(root: Path, dim: int = 6) -> Path:
    """features.npz for data=features: 24 captions of four words from SENTENCES, 5 random feature vectors each."""
    import numpy as np
    rng = np.random.default_rng(0)
    captions = [" ".join(s.split()[:4]) for s in SENTENCES] * 6
    np.savez(root / "features.npz", features=rng.random((len(captions), 5, dim)).astype(np.float32),
             texts=np.array(captions))
    return root / "features.npz"


# ---------------------------------------------------------------- mmgpt and transformers on the same directory
HF_PREFIX_DIM = 6  # features per image element of the models built from tiny Hugging Face directories


def load_mmgpt(directory, encoder: str = "linear", **free):
    """An mmgpt model from a Hugging Face directory, its image encoder seeded, in eval mode, and its tokenizer."""
    from mmgpt.hf import load_hf, load_language_model
    from mmgpt.model import MultimodalGPT, image_to_text
    config, state, tok = load_hf(directory, **image_to_text(HF_PREFIX_DIM, encoder), **free)
    torch.manual_seed(1)
    model = MultimodalGPT(config)
    load_language_model(model, state)
    return model.eval(), tok


def hf_model(directory):
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(directory).eval()


def text_logits(model, ids):
    """mmgpt's training forward with a zero-length image: the text-only logits at every position."""
    return model(torch.zeros(ids.shape[0], 0, model.config.modality("image").dim), ids)[0]


def infer_on_onnxruntime(artifacts, features: Path) -> dict:
    """infer.py's report for four samples of `features` on ONNX Runtime, checked to hold their texts."""
    from mmgpt.inference import infer
    report = infer(compose_config("infer", [f"artifacts={artifacts}", f"input={features}", "limit=4",
                                            "max_new_tokens=8", "show=0", "backend=onnxruntime"]))
    assert report["backend"] == "onnxruntime" and report["samples"] == 4
    assert all(isinstance(t, str) for t in report["texts"])
    return report
