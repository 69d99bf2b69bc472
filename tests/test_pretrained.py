"""The pretrained-GPT-2 flow end to end on a tiny model with GPT-2's 50,257-token vocabulary: train from a Hugging
Face directory with the language model frozen, export (ONNX, parity, hf/), infer on ONNX Runtime."""
import pytest
import torch

from helpers import compose_config, infer_on_onnxruntime, require, small_train_overrides, write_features, write_gpt2
from mmgpt.checkpoint import load_checkpoint
from mmgpt.hf import load_hf
from mmgpt.model import MODALITY_TABLES

transformers = require("transformers", "transformers is not installed (pip install -e .[dev])")

VOCAB = 50257  # GPT-2's: the tokenizer here is smaller, the model's rows cover GPT-2's ids


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    from mmgpt.export.pipeline import export
    from mmgpt.training import train
    root = tmp_path_factory.mktemp("pretrained")
    write_gpt2(root / "gpt2", vocab_size=VOCAB, n_positions=64)
    write_features(root)
    cfg = compose_config("train", [
        "+experiment=gpt2_features", f"model.init_from={root / 'gpt2'}", f"data.path={root / 'features.npz'}",
        *small_train_overrides(root / "run", steps=6), "data.batch_size=4", "module.max_new_tokens=8"])
    result = train(cfg)
    artifacts = export(compose_config("export", [f"ckpt={result['last_ckpt']}", f"output_root={root / 'artifacts'}",
                                                 "name=gpt2", "engine=none"]))
    return root, result, artifacts, cfg


def assert_lm_frozen_and_new_tables_learned(root, result, cfg, new_tables):
    """Every GPT-2 tensor bit-identical to the pretrained directory's, every one of the modalities' own tables
    changed from where the run started."""
    from mmgpt.training.run import setup
    pretrained = load_hf(root / "gpt2")
    trained = load_checkpoint(result["last_ckpt"])
    state = trained.model.state_dict()
    assert trained.model.config.vocab_size == VOCAB and trained.tokenizer.vocab_size < VOCAB
    lm = [name for name in state if not name.startswith(MODALITY_TABLES)]
    assert set(pretrained.state_dict) <= set(lm)
    for name, tensor in pretrained.state_dict.items():
        assert torch.equal(state[name], tensor), name
    initial = setup(cfg)[0].model.state_dict()  # the same seed: the weights this run started from
    assert all(torch.equal(initial[name], state[name]) for name in lm)
    own = [name for name in state if name.startswith(MODALITY_TABLES)]
    assert sorted(own) == sorted(new_tables)
    assert all(not torch.equal(initial[name], state[name]) for name in own), \
        "a modality's own table did not learn: freeze=lm must still train it"
    assert result["global_step"] == 6


def test_frozen_language_model_stays_bit_identical_while_the_encoder_learns(flow):
    root, result, _, cfg = flow
    assert_lm_frozen_and_new_tables_learned(root, result, cfg, [
        "encoders.features.proj.0.weight", "encoders.features.proj.0.bias", "encoders.features.proj.1.weight",
        "encoders.features.proj.1.bias", "encoders.features.proj.3.weight", "encoders.features.proj.3.bias"])


@pytest.fixture(scope="module")
def seed_flow(tmp_path_factory):
    """The seed's model: a pretrained GPT-2 whose text is the context, and a new modality (the digit drawn as pixel
    tokens) generated through a fresh embedding and head, the language model frozen."""
    from mmgpt.export.pipeline import export
    from mmgpt.training import train
    root = tmp_path_factory.mktemp("seed")
    write_gpt2(root / "gpt2", vocab_size=VOCAB, n_positions=96)
    cfg = compose_config("train", [
        "+experiment=digits_draw", f"model.init_from={root / 'gpt2'}", "module.freeze=lm",
        *small_train_overrides(root / "run", steps=6), "data.batch_size=4", "data.train_samples=40",
        "data.val_samples=4", "module.max_new_tokens=8"])
    result = train(cfg)
    artifacts = export(compose_config("export", [f"ckpt={result['last_ckpt']}", f"output_root={root / 'artifacts'}",
                                                 "name=seed", "engine=none"]))
    return root, result, artifacts, cfg


@pytest.mark.slow
def test_seed_case_new_decoded_modality_on_a_frozen_pretrained_gpt2(seed_flow):
    import json
    from mmgpt.inference import infer
    root, result, artifacts, cfg = seed_flow
    assert_lm_frozen_and_new_tables_learned(root, result, cfg, ["embeddings.image.weight", "heads.image.weight"])
    manifest = json.loads((artifacts / "model.json").read_text())
    assert manifest["model_config"]["decoded"] == "image" and manifest["model_config"]["context"] == ["text"]
    prefill = manifest["graphs"]["prefill"]
    assert list(prefill["inputs"]) == ["text_ids", "text_lengths", "input_ids", "input_lengths"]
    assert prefill["outputs"]["logits"]["shape"] == ["batch", 65]  # the drawn modality's vocabulary, not GPT-2's
    assert manifest["graphs"]["decode"]["outputs"]["logits"]["shape"] == ["batch", 65]
    parity = json.loads((artifacts / "parity.json").read_text())
    assert parity["passed"] and parity["worst"] <= 1e-4 and parity["chained"]["tokens_match"]
    ids = torch.tensor([[5, 17, 42, 300]])
    with torch.no_grad():  # hf/: GPT-2 as transformers loads it, with the original's text logits
        original = transformers.GPT2LMHeadModel.from_pretrained(root / "gpt2").eval()(ids).logits
        exported = transformers.GPT2LMHeadModel.from_pretrained(artifacts / "hf").eval()(ids).logits
    assert torch.equal(original, exported)
    tables = json.loads((artifacts / "hf" / "modalities.json").read_text())
    image = next(m for m in tables["modalities"] if m["name"] == "image")
    assert image["tensors"] == {"image.embedding": [65, 32], "image.head": [65, 32]} and image["end_id"] == 64
    report = infer(compose_config("infer", [f"artifacts={artifacts}", "limit=3", "max_new_tokens=5", "show=0",
                                            "backend=onnxruntime"]))
    assert report["decoded"] == "image" and report["texts"] == [] and len(report["sequences"]) == 3
    assert all(0 <= t < 64 for s in report["sequences"] for t in s)  # image codes: the end token cuts a sequence


def test_export_with_gpt2_vocabulary_keeps_parity_and_writes_hf(flow):
    import json
    root, _, artifacts, _ = flow
    parity = json.loads((artifacts / "parity.json").read_text())
    assert parity["passed"] and parity["worst"] <= 1e-4 and parity["chained"]["tokens_match"]
    manifest = json.loads((artifacts / "model.json").read_text())
    assert manifest["model_config"]["vocab_size"] == VOCAB
    assert manifest["tokenizer"]["type"] == "hf" and (artifacts / manifest["tokenizer"]["file"]).is_file()
    assert manifest["graphs"]["prefill"]["outputs"]["logits"]["shape"] == ["batch", VOCAB]
    # hf/ reloads in transformers, and its text-only logits are the original pretrained directory's
    ids = torch.tensor([[5, 17, 42, 300]])
    with torch.no_grad():
        original = transformers.GPT2LMHeadModel.from_pretrained(root / "gpt2").eval()(ids).logits
        exported = transformers.GPT2LMHeadModel.from_pretrained(artifacts / "hf").eval()(ids).logits
    assert torch.equal(original, exported)
    tok = transformers.AutoTokenizer.from_pretrained(artifacts / "hf")
    assert tok.eos_token == "<|endoftext|>"


def test_infer_on_onnxruntime_decodes_bpe_text(flow):
    root, _, artifacts, _ = flow
    infer_on_onnxruntime(artifacts, root / "features.npz")


def test_an_edited_tokenizer_file_is_refused(flow, tmp_path, capsys):
    """Altered merges would misspell every caption: the export's tokenizer file is checked like its weights."""
    import json
    import shutil

    from helpers import fails
    from mmgpt.inference import infer
    root, _, artifacts, _ = flow
    copy = tmp_path / "gpt2"
    shutil.copytree(artifacts, copy)
    name = json.loads((copy / "model.json").read_text())["tokenizer"]["file"]
    tokenizer = json.loads((copy / name).read_text())
    merges = tokenizer["model"]["merges"]
    merges[0], merges[1] = merges[1], merges[0]  # two merges swapped
    (copy / name).write_text(json.dumps(tokenizer))
    fails(lambda: infer(compose_config("infer", [f"artifacts={copy}", f"input={root / 'features.npz'}", "limit=2"])),
          capsys, f"{copy / name}:", "re-export")
