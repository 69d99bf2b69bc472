"""The Llama family end to end (slow: minutes on 2 cores): a tiny Llama trained from scratch on digits (train ->
export -> infer), and per family (Llama 3, Qwen2, SmolLM2-style) the pretrained recipe: train from a Hugging Face
directory with the language model frozen, export (ONNX Runtime parity, chained tokens, hf/), infer on ONNX
Runtime."""
import json

import onnx
import pytest
import torch

from helpers import (LLAMA_KINDS, compose_config, infer_on_onnxruntime, require, small_train_overrides, write_features,
                     write_llama)
from mmgpt.checkpoint import load_checkpoint
from mmgpt.contract.artifacts import Artifacts
from mmgpt.export.onnx_graphs import io_dims
from mmgpt.hf import load_hf
from mmgpt.model import MODALITY_TABLES, image_to_text

transformers = require("transformers", "transformers is not installed (pip install -e .[dev])")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A tiny Llama trained from scratch on digits for 4 steps, exported fp32 without engines."""
    from mmgpt.export.pipeline import export
    from mmgpt.training import train
    root = tmp_path_factory.mktemp("tiny_llama")
    result = train(compose_config("train", ["+experiment=digits", "model=tiny_llama",
                                            *small_train_overrides(root / "run", steps=4)]))
    return result["last_ckpt"], export(compose_config("export", [f"ckpt={result['last_ckpt']}", f"output_root={root}",
                                                             "name=llama", "engine=none"]))


@pytest.mark.slow
def test_tiny_llama_digits_train_export_infer(tiny_llama):
    from mmgpt.inference import infer
    _, path = tiny_llama
    a = Artifacts.open(path)
    c = a.manifest.config
    assert (c.family, c.n_head, c.n_kv_head) == ("llama", 4, 2)
    dims = io_dims(onnx.load(a.graph_path("decode"), load_external_data=False))
    assert dims["past_key_values.0.key"] == ["batch", 2, "cache_len", 32]  # the cache has the KV heads only
    assert dims["present.0.key"] == ["batch", 2, 1, 32]
    parity = json.loads((path / "parity.json").read_text())
    assert parity["passed"] and parity["worst"] <= 1e-4 and parity["chained"]["tokens_match"]
    assert json.loads((path / "hf" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    report = infer(compose_config("infer", [f"artifacts={path}", "limit=4", "max_new_tokens=6", "show=0",
                                            "backend=onnxruntime"]))
    assert report["backend"] == "onnxruntime" and report["samples"] == 4


@pytest.mark.slow
def test_tiny_llama_engines_build_with_tensorrt_rtx(tiny_llama, tmp_path):
    """Both strategies build on this CPU; the engines' KV inputs have the model's 2 KV heads, not its 4 query heads."""
    import shutil
    from mmgpt.export.pipeline import export
    require("tensorrt_rtx", "TensorRT-RTX is not installed (pip install tensorrt-rtx-cu13)")
    path = tmp_path / "llama"
    shutil.copytree(tiny_llama[1], path)
    for strategy in ("two_engines", "shared"):
        export(compose_config("export", [f"artifacts={path}", "engine=tensorrt_rtx", f"engine.strategy={strategy}",
                                         "engine.compute_capability=SM89", "engine.profiles.batch=[1,2,8]",
                                         "engine.profiles.prompt=[1,4,32]", "engine.profiles.capacity=[64,128,128]"]))
    entries = Artifacts.open(path).manifest.engines
    assert set(entries) == {"two_engines", "shared"}
    for strategy in entries.values():
        for engine in strategy.engines.values():
            kv = [t for t in engine.io if t.startswith(("past_key_values.", "present."))]
            assert kv and all(engine.io[t]["shape"][1:4:2] == [2, 32] for t in kv), {t: engine.io[t] for t in kv}
    assert entries["shared"].total_bytes < entries["two_engines"].total_bytes


@pytest.mark.slow
def test_tiny_llama_fp16_export_parity(tiny_llama, tmp_path):
    """RMSNorm's statistics and RoPE's angles stay fp32 inside an fp16 graph: parity holds at fp16's bound."""
    from mmgpt.export.pipeline import export
    path = export(compose_config("export", [f"ckpt={tiny_llama[0]}", f"output_root={tmp_path}", "name=h",
                                            "dtype=fp16", "engine=none"]))
    parity = json.loads((path / "parity.json").read_text())
    assert parity["dtype"] == "float16" and parity["bound_held"] and parity["chained"]["tokens_match"], parity["worst"]


@pytest.fixture(scope="module", params=[pytest.param(k, marks=pytest.mark.slow) for k in LLAMA_KINDS])
def flow(request, tmp_path_factory):
    from mmgpt.export.pipeline import export
    from mmgpt.training import train
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    write_llama(root / "hf_in", kind, max_position_embeddings=128)
    write_features(root)
    cfg = compose_config("train", [
        "+experiment=llama_features", f"model.init_from={root / 'hf_in'}", f"data.path={root / 'features.npz'}",
        *small_train_overrides(root / "run", steps=4), "data.batch_size=4", "module.max_new_tokens=8"])
    result = train(cfg)
    artifacts = export(compose_config("export", [f"ckpt={result['last_ckpt']}", f"output_root={root / 'artifacts'}",
                                                 f"name={kind}", "engine=none"]))
    return kind, root, result, artifacts


def test_frozen_language_model_stays_bit_identical(flow):
    kind, root, result, _ = flow
    pretrained = load_hf(root / "hf_in", **image_to_text(6))
    state = load_checkpoint(result["last_ckpt"]).model.state_dict()
    for name, tensor in pretrained.state_dict.items():
        assert torch.equal(state[name], tensor), name
    assert len(pretrained.state_dict) == len([n for n in state if not n.startswith(MODALITY_TABLES)]) - (
        1 if LLAMA_KINDS[kind][2]["tie_word_embeddings"] else 0)  # a tied head is the token table, stored once
    assert result["global_step"] == 4


def test_export_parity_chained_tokens_and_hf_in_its_own_family(flow):
    kind, root, _, artifacts = flow
    parity = json.loads((artifacts / "parity.json").read_text())
    assert parity["passed"] and parity["worst"] <= 1e-4 and parity["chained"]["tokens_match"]
    assert {c["graph"] for c in parity["cases"]} == {"prefill", "decode"}
    original = json.loads((root / "hf_in" / "config.json").read_text())
    written = json.loads((artifacts / "hf" / "config.json").read_text())
    assert written["architectures"] == original["architectures"]
    ids = torch.tensor([[5, 17, 42, 300]])
    with torch.no_grad():
        before = transformers.AutoModelForCausalLM.from_pretrained(root / "hf_in").eval()(ids).logits
        after = transformers.AutoModelForCausalLM.from_pretrained(artifacts / "hf").eval()(ids).logits
    assert torch.equal(before, after)


def test_infer_on_onnxruntime(flow):
    _, root, _, artifacts = flow
    infer_on_onnxruntime(artifacts, root / "features.npz")
