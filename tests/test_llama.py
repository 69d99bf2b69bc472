"""The Llama family (Llama 3 with RoPE scaling, Qwen2 with q/k/v biases, SmolLM2-style tied embeddings): tiny random
models built by transformers load into mmgpt and compute what transformers computes, generate what it generates,
and are written back in their own format."""
import json

import pytest
import torch

from helpers import HF_PREFIX_DIM as PREFIX_DIM
from helpers import (KERNEL_DEVICE, KERNEL_RTOL, LLAMA_KINDS, SENTENCES, greedy_ours_and_hf, hf_model, load_mmgpt,
                     require, text_logits, write_llama)
from mmgpt.hf import HFFormatError, load_hf, save_hf
from mmgpt.model import GPTConfig, MultimodalGPT, image_to_text

transformers = require("transformers", "transformers is not installed (pip install -e .[dev])")

KINDS = list(LLAMA_KINDS)


@pytest.fixture(scope="module", params=KINDS)
def llama_dir(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param, numbered=False)  # the name says the kind
    write_llama(d, request.param)
    return d


def test_config_per_family(llama_dir):
    model, tok = load_mmgpt(llama_dir)
    c, kind = model.config, llama_dir.name
    assert (c.family, c.n_head, c.n_kv_head, c.intermediate_size) == ("llama", 4, LLAMA_KINDS[kind][2][
        "num_key_value_heads"], 96)
    assert c.qkv_bias == (kind == "qwen2") and c.tie_weights == (kind == "smollm2")
    assert (c.rope_scaling is not None) == (kind == "llama")
    assert tok.bos_id == 320 and tok.eos_id == tok.pad_id == 321  # the model's own BOS / EOS; PAD falls back to EOS
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (c.n_kv_head * 16, 64)


def test_text_and_multimodal_logits_match_transformers(llama_dir):
    model, tok = load_mmgpt(llama_dir, "mlp")
    hf = hf_model(llama_dir)
    ids = torch.tensor([tok.encode(s)[:12] for s in SENTENCES])
    with torch.no_grad():
        want = hf(input_ids=ids).logits
        assert want.abs().max() > 1  # far from zero: the tolerance below is meaningful
        assert (text_logits(model, ids) - want).abs().max() <= 1e-5
        prefix = torch.randn(len(SENTENCES), 5, PREFIX_DIM)
        embeds = torch.cat([model.encoders["image"](prefix), hf.get_input_embeddings()(ids)], dim=1)
        want = hf(inputs_embeds=embeds).logits[:, 5:]
        assert (model(prefix, ids)[0] - want).abs().max() <= 1e-5
        assert (model(prefix.flip(1), ids)[0] - want).abs().max() > 1e-3  # positions matter (RoPE is applied)


def test_llama3_rope_scaling_matters(tmp_path):
    """Negative control: the same weights without the scaling compute other logits (positions past the
    scaling's short wavelengths)."""
    write_llama(tmp_path, "llama")
    model, tok = load_mmgpt(tmp_path)
    unscaled = MultimodalGPT(GPTConfig(**{**model.config.to_dict(), "rope_scaling": None}))
    unscaled.load_state_dict(model.state_dict())
    ids = torch.tensor([tok.encode(SENTENCES[2])[:40]])
    with torch.no_grad():
        assert (text_logits(unscaled.eval(), ids) - text_logits(model, ids)).abs().max() > 1e-3


def test_greedy_ragged_batch_matches_transformers_generate(llama_dir, tmp_path):
    model, tok = load_mmgpt(llama_dir)
    ours, theirs = greedy_ours_and_hf(model, tok, tmp_path / "hf", PREFIX_DIM)
    for row_ours, row_theirs in zip(ours.tolist(), theirs.tolist()):  # ours stops at EOS, HF was told not to
        n = row_ours.index(tok.eos_id) + 1 if tok.eos_id in row_ours else len(row_ours)
        assert row_ours[:n] == row_theirs[:n] and n > 3
    assert len(set(ours.flatten().tolist())) > 3  # not a degenerate repetition


def test_save_hf_reloads_in_its_own_family(llama_dir, tmp_path):
    model, tok = load_mmgpt(llama_dir)
    out = save_hf(model, tok, tmp_path / "hf")
    written = json.loads((out / "config.json").read_text())
    original = json.loads((llama_dir / "config.json").read_text())
    assert written["architectures"] == original["architectures"] and written["model_type"] == original["model_type"]
    reloaded = hf_model(out)
    assert type(reloaded).__name__ == original["architectures"][0]
    ids = torch.tensor([tok.encode(s)[:12] for s in SENTENCES])
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, hf_model(llama_dir)(input_ids=ids).logits)
    with open(out / "model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert ("lm_head.weight" in header) == (not model.config.tie_weights) and "model.embed_tokens.weight" in header
    again, _ = load_mmgpt(out)
    assert again.config.to_dict() == model.config.to_dict()


def test_sharded_safetensors_load(tmp_path):
    hf = write_llama(tmp_path / "one", "llama")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "sharded" / f).write_bytes((tmp_path / "one" / f).read_bytes())
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    model, tok = load_mmgpt(tmp_path / "sharded")
    ids = torch.tensor([tok.encode(SENTENCES[0])])
    with torch.no_grad():
        assert (text_logits(model, ids) - hf(input_ids=ids).logits).abs().max() <= 1e-5
    next(iter((tmp_path / "sharded").glob("model-*.safetensors"))).unlink()
    with pytest.raises(HFFormatError, match="names the shard .* which is missing"):
        load_hf(tmp_path / "sharded", **image_to_text(PREFIX_DIM))


def test_legacy_rope_fields_of_hub_files(tmp_path):
    """Hub config.json files carry rope_theta + rope_scaling (with `type` in older ones), not rope_parameters."""
    write_llama(tmp_path, "llama")
    path = tmp_path / "config.json"
    cfg = json.loads(path.read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = {**params, "type": params.pop("rope_type")}
    path.write_text(json.dumps(cfg))
    config, _, _ = load_hf(tmp_path, **image_to_text(PREFIX_DIM))
    assert config.rope_theta == 500000.0 and config.rope_scaling.factor == 8.0
    assert config.rope_scaling.original_max_position_embeddings == 32


def edit_config(directory, **fields):
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.mark.parametrize("kind, fields, message", [
    ("qwen2", {"use_sliding_window": True}, "use_sliding_window=True is not supported"),
    ("qwen2", {"layer_types": ["sliding_attention", "full_attention"]}, "layer_types ['full_attention', "
                                                                       "'sliding_attention'] is not supported"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
     "RoPE type 'yarn' is not supported"),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}},
     "llama3 RoPE scaling: rope_scaling: needs exactly the keys"),
    ("llama", {"num_local_experts": 8}, "num_local_experts=8 is not supported (mixture-of-experts"),
    ("llama", {"attention_bias": True}, "attention_bias=True is not supported"),
    ("llama", {"mlp_bias": True}, "mlp_bias=True is not supported"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ("llama", {"head_dim": 32}, "head_dim=32 is not supported"),
    ("llama", {"num_key_value_heads": 3}, "n_kv_head=3 must divide n_head=4"),
    ("llama", {"intermediate_size": None}, "intermediate_size is None"),
])
def test_config_fields_mmgpt_cannot_represent(tmp_path, kind, fields, message):
    write_llama(tmp_path, kind)
    edit_config(tmp_path, **fields)
    with pytest.raises(HFFormatError, match=None) as e:
        load_hf(tmp_path, **image_to_text(PREFIX_DIM))
    assert message in str(e.value)


def test_gpt2_config_refuses_llama_fields():
    with pytest.raises(Exception, match="n_kv_head=2.*set family=llama"):
        GPTConfig(n_head=4, n_embd=64, n_kv_head=2)
    with pytest.raises(Exception, match="intermediate_size=None: a llama model needs its MLP width"):
        GPTConfig(n_head=4, n_embd=64, family="llama")
    with pytest.raises(Exception, match="family='mamba': choose one of"):
        GPTConfig(family="mamba")


def test_fused_kernels_decode_a_transformers_checkpoint(llama_dir):
    """One decode step after an image prefix and a prompt (prefilled by the torch model) of a checkpoint written by
    transformers: the fused kernels' logits and stored key / value are the torch backend's."""
    require("triton", "triton is not installed (pip install -e .[dev])")
    from mmgpt.runtime.backends.fused_triton import TritonBackend
    from mmgpt.runtime.backends.torch_model import TorchBackend
    model, tok = load_mmgpt(llama_dir)
    model = model.to(KERNEL_DEVICE)
    reference = TorchBackend(model)
    prompt = torch.tensor([tok.encode(SENTENCES[0])[:12]], device=KERNEL_DEVICE)
    prefix = torch.randn(1, 5, PREFIX_DIM, device=KERNEL_DEVICE)
    with torch.no_grad():
        logits, keys, values = reference.prefill(prefix, prompt, torch.tensor([12], device=KERNEL_DEVICE))
    N = keys[0].shape[2]  # 17: past Llama 3's scaled wavelengths
    caches = []
    for past in (keys, values):
        cache = torch.zeros(len(past), 1, model.config.n_kv_head, N + 8, model.config.head_dim, device=KERNEL_DEVICE)
        cache[:, :, :, :N] = torch.stack(past)
        caches.append(cache)
    ids, pos = logits.argmax(-1, keepdim=True), torch.tensor([[N]], device=KERNEL_DEVICE)
    with torch.no_grad():
        want = reference.decode(ids, pos, *caches)
        theirs = [c.clone() for c in caches]
        got = TritonBackend(model).decode(ids, pos, *theirs)
    assert want.abs().max() > 1  # far from zero: the tolerance below is meaningful
    assert (got - want).abs().max() <= 10 * KERNEL_RTOL * want.abs().max()
    for mine, ref in zip(theirs, caches):
        assert torch.allclose(mine, ref, atol=KERNEL_RTOL, rtol=KERNEL_RTOL)
