"""Hugging Face interop: a GPT-2 directory saved by transformers loads into mmgpt and computes what transformers
computes; mmgpt writes it back in a form transformers (and any prefix-embeds runtime) reloads."""
import json

import pytest
import torch

from helpers import HF_PREFIX_DIM as PREFIX_DIM
from helpers import (EOT, SENTENCES, greedy_ours_and_hf, hf_model, load_mmgpt, require, text_logits, train_tokenizer,
                     write_gpt2)
from mmgpt.data.samples import IGNORE_INDEX, tokenize_captions
from mmgpt.hf import HFFormatError, load_hf, load_language_model, load_modality_tables, save_hf
from mmgpt.model import GPTConfig, MultimodalGPT, image_to_text
from mmgpt.tokenizer import ByteTokenizer, TokenizerError, check_tokenizer_fits, load_hf_tokenizer, tokenizer_from_dict

transformers = require("transformers", "transformers is not installed (pip install -e .[dev])")  # a dev dependency

TEXT = "héllo 日本 🙂"


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2")
    write_gpt2(d)
    return d


# ---------------------------------------------------------------- tokenizer
@pytest.mark.parametrize("files", ["json", "vocab+merges"])
def test_hf_tokenizer_gpt2_conventions_and_multibyte_text(tmp_path, files):
    write_gpt2(tmp_path, tokenizer_files=files)
    tok = load_hf_tokenizer(tmp_path)
    eot = train_tokenizer().token_to_id(EOT)
    assert tok.bos_id == tok.eos_id == tok.pad_id == eot
    assert tok.vocab_size == eot + 1
    ids = tok.encode(TEXT, bos=True, eos=True)
    assert ids[0] == ids[-1] == eot and ids[1:-1] == train_tokenizer().encode(TEXT).ids
    pieces = [tok.decode([i]) for i in ids[1:-1]]
    assert any("\ufffd" in p for p in pieces)  # some character's bytes are split across tokens...
    assert tok.decode(ids[1:]) == TEXT  # ...and decode joins them; it stops at EOS
    assert tok.decode([*ids[1:-1], eot, *ids[1:3]]) == TEXT
    assert tok.decode([eot]) == ""
    assert tok.decode([*tok.encode("the", bos=False), 10_000]) == "the"  # padded-vocabulary ids are dropped
    assert tok.encode(f"a{EOT}b", bos=False) == [*tok.encode("a", bos=False), eot, *tok.encode("b", bos=False)]
    again = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    assert again.encode(TEXT) == tok.encode(TEXT) and again.decode(ids[1:]) == TEXT
    assert (again.bos_id, again.eos_id, again.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)


def test_captions_with_pad_equal_to_eos_still_learn_eos_once(gpt2_dir):
    tok = load_hf_tokenizer(gpt2_dir)
    captions = ["the quick brown fox", "a nine"]
    input_ids, targets_all = tokenize_captions(tok, captions)
    batch = {"input_ids": input_ids, "targets": targets_all}
    for b, c in enumerate(captions):
        n = len(tok.encode(c, bos=True, eos=True))
        assert batch["input_ids"][b, 0] == tok.bos_id
        targets = batch["targets"][b]
        assert targets[n - 2] == tok.eos_id  # the last real token predicts EOS...
        assert (targets[: n - 2] != tok.eos_id).all()
        assert (targets[n - 1:] == IGNORE_INDEX).all()  # ...and padding (also EOS's id) predicts nothing
    assert (batch["input_ids"][1, len(tok.encode(captions[1], eos=True)):] == tok.pad_id).all()


def test_special_tokens_named_in_tokenizer_config(tmp_path):
    bpe = train_tokenizer(special="</s>")
    bpe.add_special_tokens(["<pad>"])
    bpe.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match=r"no '<\|endoftext\|>' \(GPT-2's end-of-text token; no eos_token in "
                                             r"tokenizer_config.json or special_tokens_map.json\)"):
        load_hf_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>", "eos_token": "<x>"}))
    tok = load_hf_tokenizer(tmp_path)
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (bpe.token_to_id("</s>"), bpe.token_to_id("</s>"),
                                                    bpe.token_to_id("<pad>"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    with pytest.raises(TokenizerError, match="no '<eos>' .named as eos_token in tokenizer_config.json"):
        load_hf_tokenizer(tmp_path)


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerError, match=r"no tokenizer.json or vocab.json \+ merges.txt; copy"):
        load_hf_tokenizer(tmp_path)
    train_tokenizer().save_model(str(tmp_path))
    (tmp_path / "merges.txt").unlink()
    with pytest.raises(TokenizerError, match=r"\(only vocab.json\)"):
        load_hf_tokenizer(tmp_path)


def test_tokenizer_must_fit_the_model_vocabulary(tmp_path):
    write_gpt2(tmp_path)
    tok = load_hf_tokenizer(tmp_path)
    check_tokenizer_fits(tok, GPTConfig(vocab_size=tok.vocab_size))
    with pytest.raises(TokenizerError, match=f"ids up to {tok.vocab_size - 1}, but the model's vocab_size is 300"):
        check_tokenizer_fits(tok, GPTConfig(vocab_size=300))
    with pytest.raises(TokenizerError, match="model's vocab_size is 300"):  # load_hf checks it too
        write_gpt2(tmp_path, vocab_size=300)
        load_hf(tmp_path)


# ---------------------------------------------------------------- GPT-2 in
def test_text_and_multimodal_logits_match_transformers(gpt2_dir):
    model, tok = load_mmgpt(gpt2_dir, "mlp")
    hf = hf_model(gpt2_dir)
    ids = torch.tensor([tok.encode(s)[:12] for s in SENTENCES])
    with torch.no_grad():
        assert (text_logits(model, ids) - hf(input_ids=ids).logits).abs().max() <= 1e-5
        prefix = torch.randn(len(SENTENCES), 5, PREFIX_DIM)
        embeds = torch.cat([model.encoders["image"](prefix), hf.get_input_embeddings()(ids)], dim=1)
        want = hf(inputs_embeds=embeds).logits[:, 5:]
        assert (model(prefix, ids)[0] - want).abs().max() <= 1e-5


def test_greedy_ragged_batch_matches_transformers_generate(gpt2_dir, tmp_path):
    model, tok = load_mmgpt(gpt2_dir)
    ours, theirs = greedy_ours_and_hf(model, tok, tmp_path / "hf", PREFIX_DIM)
    assert torch.equal(ours, theirs)
    assert len(set(ours.flatten().tolist())) > 3  # not a degenerate repetition


def test_weights_in_gpt2model_naming_from_pytorch_model_bin(tmp_path):
    """Older GPT-2 files: GPT2Model names (no `transformer.`), causal-mask buffers, a pickled state dict."""
    hf = write_gpt2(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "pytorch_model.bin")
    model, tok = load_mmgpt(tmp_path)
    ids = torch.tensor([tok.encode(SENTENCES[0])])
    with torch.no_grad():
        assert (text_logits(model, ids) - hf(input_ids=ids).logits).abs().max() <= 1e-5


def test_exact_gelu_round_trip(tmp_path):
    hf = write_gpt2(tmp_path / "in", activation="gelu")
    model, tok = load_mmgpt(tmp_path / "in")
    assert model.config.activation == "gelu"
    ids = torch.tensor([tok.encode(SENTENCES[1])])
    save_hf(model, tok, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["activation_function"] == "gelu"
    with torch.no_grad():
        tanh_model = MultimodalGPT(GPTConfig(**{**model.config.to_dict(), "activation": "gelu_tanh"}))
        tanh_model.load_state_dict(model.state_dict())
        assert (text_logits(tanh_model, ids) - hf(input_ids=ids).logits).abs().max() > 1e-4  # the choice matters
        assert (text_logits(model, ids) - hf(input_ids=ids).logits).abs().max() <= 1e-5
        assert (hf_model(tmp_path / "out")(input_ids=ids).logits - hf(input_ids=ids).logits).abs().max() == 0


# ---------------------------------------------------------------- GPT-2 out
@pytest.mark.parametrize("encoder", ["linear", "mlp"])
def test_save_hf_gpt2_reloads_in_transformers(gpt2_dir, tmp_path, encoder):
    model, tok = load_mmgpt(gpt2_dir, encoder)
    out = save_hf(model, tok, tmp_path / "hf")
    reloaded = hf_model(out)
    ids = torch.tensor([tok.encode(s)[:12] for s in SENTENCES])
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, hf_model(gpt2_dir)(input_ids=ids).logits)
    with open(out / "model.safetensors", "rb") as f:  # the tied head is not stored twice
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert "lm_head.weight" not in header and "transformer.wte.weight" in header

    auto = transformers.AutoTokenizer.from_pretrained(out)
    assert auto(TEXT).input_ids == tok.encode(TEXT, bos=False)
    assert auto.decode(auto(TEXT).input_ids) == TEXT
    assert auto.eos_token_id == auto.bos_token_id == auto.pad_token_id == tok.eos_id

    prefix = torch.randn(2, 3, PREFIX_DIM)
    spec = json.loads((out / "modalities.json").read_text())
    image = spec["modalities"][0]
    assert (image["name"], image["encoder"], image["dim"], spec["n_embd"], spec["dtype"]) == \
        ("image", encoder, PREFIX_DIM, 32, "float32")
    assert (spec["context"], spec["decoded"]) == (["image"], "text")
    with torch.no_grad():
        assert torch.allclose(load_modality_tables(out).embed("image", prefix), model.encoders["image"](prefix),
                              atol=1e-6)

    again, state, tok_again = load_hf(out, **image_to_text(PREFIX_DIM, encoder))
    assert again == model.config
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert tok_again.encode(TEXT) == tok.encode(TEXT)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # written in a sibling, renamed, nothing left


def test_byte_tokenizer_is_written_as_an_equivalent_hf_tokenizer(tmp_path):
    tok = ByteTokenizer()
    model = MultimodalGPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=tok.vocab_size))
    save_hf(model, tok, tmp_path / "hf")
    text = TEXT + "\n\t<x> the end"
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert auto(text).input_ids == tok.encode(text, bos=False)
    assert auto.decode(tok.encode(text, bos=False)) == text
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    hf_tok = load_hf_tokenizer(tmp_path / "hf")
    assert (hf_tok.bos_id, hf_tok.eos_id, hf_tok.pad_id, hf_tok.vocab_size) == \
        (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size)
    ids = tok.encode(text, eos=True) + [tok.pad_id]
    assert hf_tok.encode(text, eos=True) == ids[:-1] and hf_tok.decode(ids[1:]) == tok.decode(ids[1:]) == text
    assert "byte-level tokenizer" in (tmp_path / "hf" / "README.md").read_text()


def test_untied_head_round_trip(tmp_path):
    hf = write_gpt2(tmp_path / "in", tie_word_embeddings=False)
    model, tok = load_mmgpt(tmp_path / "in")
    assert not model.config.tie_weights
    assert not torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    save_hf(model, tok, tmp_path / "out")
    ids = torch.tensor([tok.encode(SENTENCES[2])])
    with torch.no_grad():
        assert (text_logits(model, ids) - hf(input_ids=ids).logits).abs().max() <= 1e-5
        assert torch.equal(hf_model(tmp_path / "out")(input_ids=ids).logits, hf(input_ids=ids).logits)


def test_a_failed_save_leaves_the_previous_directory(gpt2_dir, tmp_path, monkeypatch):
    model, tok = load_mmgpt(gpt2_dir)
    save_hf(model, tok, tmp_path / "hf")
    before = {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr("mmgpt.hf.save_file", disk_full)
    with pytest.raises(OSError, match="disk full"):
        save_hf(model, tok, tmp_path / "hf")
    assert {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_load_language_model_refuses_another_shape(gpt2_dir):
    config, state, _ = load_hf(gpt2_dir)
    with pytest.raises(HFFormatError, match="do not fit this model"):
        load_language_model(MultimodalGPT(GPTConfig(**{**config.to_dict(), "n_layer": 3})), state)


def test_save_refuses_a_model_without_biases(tmp_path):
    model = MultimodalGPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, bias=False))
    with pytest.raises(HFFormatError, match="always has biases"):
        save_hf(model, ByteTokenizer(), tmp_path / "hf")
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- bad inputs
def edit_config(directory, **fields):
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.mark.parametrize("fields, message", [
    ({"model_type": "mistral"}, "model_type 'mistral' is not supported; mmgpt loads gpt2, llama, qwen2"),
    ({"activation_function": "relu"}, ("activation_function='relu' is not supported; choose one of gelu_new, "
                                       "gelu_pytorch_tanh, gelu")),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True is not supported"),
    ({"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn=True is not supported"),
    ({"add_cross_attention": True}, "add_cross_attention=True is not supported"),
    ({"scale_attn_weights": False}, "scale_attn_weights=False is not supported"),
    ({"n_inner": 100}, r"n_inner=100 is not supported; mmgpt's MLP width is 4 \* n_embd = 128"),
    ({"n_layer": None}, "n_layer is None; a GPT-2 config.json has positive integers vocab_size"),
])
def test_config_fields_mmgpt_cannot_represent(tmp_path, fields, message):
    write_gpt2(tmp_path)
    edit_config(tmp_path, **fields)
    with pytest.raises(HFFormatError, match=message):
        load_hf(tmp_path)


def test_bad_directories(tmp_path):
    with pytest.raises(HFFormatError, match="no config.json; expected a Hugging Face GPT-2 or Llama-family directory"):
        load_hf(tmp_path)
    write_gpt2(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["n_head"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFFormatError, match="n_head is missing; a GPT-2 config.json"):
        load_hf(tmp_path)
    write_gpt2(tmp_path)
    with pytest.raises(HFFormatError, match=r"\['n_layer', 'prefix_len'\] cannot be set: .* determines every "
                                            "model config field except modalities, context, decoded, dropout"):
        load_hf(tmp_path, n_layer=3, prefix_len=3)

    weights = tmp_path / "model.safetensors"
    from safetensors.torch import load_file, save_file
    state = load_file(weights)
    save_file({k: v for k, v in state.items() if "h.1.mlp" not in k}, weights)
    with pytest.raises(HFFormatError, match=r"weights do not match config.json \(missing \['transformer.h.1.mlp"):
        load_hf(tmp_path)
    save_file({**state, "transformer.extra": torch.zeros(1)}, weights)
    with pytest.raises(HFFormatError, match=r"unexpected \['transformer.extra'\]"):
        load_hf(tmp_path)
    weights.write_bytes(b"not safetensors")
    with pytest.raises(HFFormatError, match="model.safetensors: cannot be read"):
        load_hf(tmp_path)
    weights.unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(HFFormatError, match="pytorch_model.bin: cannot be read"):
        load_hf(tmp_path)
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(HFFormatError, match="no model.safetensors.index.json or model.safetensors or "
                                            "pytorch_model.bin"):
        load_hf(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match="no tokenizer.json or vocab.json"):
        load_hf(tmp_path)


def test_config_validates_activation():
    with pytest.raises(ValueError, match="activation='relu': choose 'gelu_tanh' or 'gelu'"):
        GPTConfig(activation="relu")


def test_fused_kernels_refuse_exact_gelu():
    require("triton", "triton is not installed (pip install -e .[dev])")
    from mmgpt.runtime.backends.fused_triton import TritonBackend
    with pytest.raises(ValueError, match="tanh GELU"):
        TritonBackend(MultimodalGPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, activation="gelu")))
