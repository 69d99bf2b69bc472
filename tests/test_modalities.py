"""Modalities: a discrete ragged context and a new decoded modality with its own embedding and head. Two flows
(prefill + decode steps) must compute what one teacher-forced forward computes, on every backend."""
import pytest
import torch

from helpers import KERNEL_DEVICE
from mmgpt.data.samples import right_pad
from mmgpt.model import GPTConfig, Modality, MultimodalGPT
from mmgpt.runtime.backends.torch_model import TorchBackend
from mmgpt.runtime.generator import Generator
from mmgpt.tokenizer import ByteTokenizer

PIXELS = Modality("pixels", "discrete", vocab_size=19, end_id=18, head=True)


def seed_model(context=("text", "feats"), text_head=False, **kw) -> MultimodalGPT:
    """GPT-2-shaped: text (GPT-2's tables) and features in, a new pixel modality out."""
    torch.manual_seed(0)
    modalities = [Modality("text", "discrete", head=text_head), Modality("feats", "continuous", dim=5), PIXELS]
    cfg = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=300, modalities=modalities,
               context=list(context), decoded="pixels")
    return MultimodalGPT(GPTConfig(**{**cfg, **kw})).eval()


def ragged_context(B=3, g=None):
    g = g or torch.Generator().manual_seed(1)
    lengths = torch.tensor([5, 2, 0])[:B]  # ragged captions, one empty
    return {"text": (torch.randint(0, 300, (B, 5), generator=g), lengths), "feats": torch.randn(B, 3, 5, generator=g)}


def row_of(context: dict, b: int) -> dict:
    """Row b of a context alone, its discrete segments cut to their real tokens."""
    return {n: v[b: b + 1] if torch.is_tensor(v) else (v[0][b: b + 1, : v[1][b]], v[1][b: b + 1])
            for n, v in context.items()}


def two_flows_vs_forward(model, backend, context, vocab=19, steps=6):
    """Max |prefill + decode steps - teacher-forced forward| over each row's logits, prompts ragged."""
    B = next(v if torch.is_tensor(v) else v[0] for v in context.values()).shape[0]
    g = torch.Generator().manual_seed(2)
    T, lengths = 4, torch.tensor([4, 1, 3])[:B]
    prompt = torch.randint(0, vocab, (B, T), generator=g)
    cont = torch.randint(0, vocab, (B, steps), generator=g)
    real = sum(v.shape[1] if torch.is_tensor(v) else v[1] for v in context.values())  # each row's real context
    c = model.config
    with torch.no_grad():
        logits, keys, values = backend.prefill(context, prompt, lengths)
        S, N = 64, keys[0].shape[2]
        k_cache = torch.zeros(c.n_layer, B, c.n_head, S, c.head_dim)
        v_cache = torch.zeros_like(k_cache)
        k_cache[:, :, :, :N] = torch.stack(keys)
        v_cache[:, :, :, :N] = torch.stack(values)
        pos = (real + lengths)[:, None]
        got = [logits]
        for i in range(steps):
            got.append(backend.decode(cont[:, i: i + 1], pos, k_cache, v_cache))
            pos = pos + 1
        worst = 0.0
        for b in range(B):  # reference: one forward per row over its real tokens only
            full, _ = model(row_of(context, b), torch.cat([prompt[b, : lengths[b]], cont[b]])[None])
            want = full[0, lengths[b] - 1:]
            worst = max(worst, (torch.stack([s[b] for s in got]) - want).abs().max().item())
    return worst


@pytest.mark.parametrize("context", [("text", "feats"), ("feats", "text")])
def test_two_flows_equal_one_forward_with_a_ragged_discrete_context(context):
    model = seed_model(context)
    assert two_flows_vs_forward(model, TorchBackend(model), ragged_context()) <= 1e-5


def test_padding_of_a_ragged_context_changes_nothing():
    """The same rows with more padding (and garbage ids in it) give the same logits: padding is packed away."""
    model = seed_model()
    ctx = ragged_context()
    ids, lengths = ctx["text"]
    wider = torch.cat([ids, torch.randint(0, 300, (3, 4))], dim=1)
    prompt, plen = torch.tensor([[18], [18], [18]]), torch.ones(3, dtype=torch.long)
    with torch.no_grad():
        a = model.forward_cached(ctx, prompt, plen, torch.zeros(3, dtype=torch.long), None, None)[0]
        b = model.forward_cached({**ctx, "text": (wider, lengths)}, prompt, plen, torch.zeros(3, dtype=torch.long),
                                 None, None)[0]
        c = model.forward_cached({**ctx, "text": (wider, lengths + 1)}, prompt, plen,
                                 torch.zeros(3, dtype=torch.long), None, None)[0]
    assert (a - b).abs().max().item() <= 1e-5
    assert (a - c).abs().max().item() > 1e-3  # negative control: one more real token does change them


def test_decoded_modality_uses_its_own_tables():
    model = seed_model()
    assert model.table("pixels") is model.embeddings["pixels"] and model.head("pixels") is model.heads["pixels"]
    assert model.table("text") is model.transformer.wte and model.heads["pixels"].weight.shape == (19, 32)
    prompt = torch.tensor([[18, 3]])
    with torch.no_grad():
        logits = model.forward_cached(ragged_context(1), prompt, torch.tensor([2]), torch.tensor([0]), None, None)[0]
        model.heads["pixels"].weight.mul_(2.0)
        doubled = model.forward_cached(ragged_context(1), prompt, torch.tensor([2]), torch.tensor([0]), None, None)[0]
    assert logits.shape == (1, 19) and torch.allclose(doubled, 2 * logits, atol=1e-5)


def test_loss_weights_each_modality_with_a_head():
    model = seed_model(text_head=True)
    ctx = ragged_context()
    ids = torch.randint(0, 18, (3, 4))
    targets = torch.randint(0, 18, (3, 4))
    logits, both = model(ctx, ids, targets)
    decoded_only = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    assert not torch.allclose(both, decoded_only)  # the text context's own next-token loss is in it
    cfg = model.config.to_dict()
    cfg["modalities"][0]["loss_weight"] = 0.0
    weighted = MultimodalGPT(GPTConfig.from_dict(cfg)).eval()
    weighted.load_state_dict(model.state_dict())
    assert torch.allclose(weighted(ctx, ids, targets)[1], decoded_only, atol=1e-6)


def test_generator_samples_the_new_modality_and_stops_at_its_own_end_token():
    model = seed_model()
    e = torch.ones(32)
    with torch.no_grad():  # every position's final hidden state is e: the head row equal to e wins
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(e)
        model.heads["pixels"].weight.zero_()
    gen = Generator(TorchBackend(model), ByteTokenizer(), max_positions=64, cuda_graph=False, eos_check_interval=1)
    ctx = {"text": [[1, 2, 3], []], "feats": torch.randn(2, 3, 5)}
    with torch.no_grad():
        model.heads["pixels"].weight[5] = e
    result = gen.generate(ctx, max_new_tokens=5)  # negative control: token 5 is no end, every row runs to the limit
    assert result.texts == [] and result.sequences == [[5] * 5, [5] * 5]
    with torch.no_grad():
        model.heads["pixels"].weight[5] = 0
        model.heads["pixels"].weight[18] = e
    result = gen.generate(ctx, max_new_tokens=5)
    assert result.sequences == [[], []] and result.num_generated.tolist() == [1, 1]
    assert result.decode_steps == 0  # every row ended on its first token: no decode step runs


@pytest.mark.parametrize("change, message", [
    (dict(decoded="feats"), "continuous modality: only a discrete one"),
    (dict(modalities=[Modality("text", "discrete"), Modality("feats", "continuous", dim=5),
                      Modality("pixels", "discrete", vocab_size=0, end_id=0, head=True)]), "vocabulary of at least"),
    (dict(context=["text", "audio"]), "which model.modalities does not declare"),
    (dict(modalities=[Modality("text", "discrete", vocab_size=50), Modality("feats", "continuous", dim=5), PIXELS]),
     "the text tables have vocab_size=300"),
])
def test_bad_modality_configs_are_user_errors(change, message):
    from mmgpt.errors import UserError
    with pytest.raises(UserError, match=message):
        seed_model(**change)


def test_token_outside_its_modality_vocabulary_is_refused():
    from mmgpt.errors import UserError
    gen = Generator(TorchBackend(seed_model()), ByteTokenizer(), max_positions=64, cuda_graph=False)
    with pytest.raises(UserError, match=r"text context row 1 holds token id\(s\) \[300\]"):
        gen.generate({"text": [[1], [300]], "feats": torch.randn(2, 3, 5)}, max_new_tokens=2)
    with pytest.raises(UserError, match=r"prompt 0 holds token id\(s\) \[19\]"):
        gen.generate({"text": [[1]], "feats": torch.randn(1, 3, 5)}, prompts=[[19]], max_new_tokens=2)
    gen.generate({"text": [[299]], "feats": torch.randn(1, 3, 5)}, prompts=[[18]], max_new_tokens=2)  # in range


# ---------------------------------------------------------------- every backend, from an export of digits_draw
def draw_context(artifacts, B=3):
    tok = artifacts.tokenizer
    captions = ["seven sum 7", "one sum 1", ""][:B]  # ragged, one empty
    return {"text": right_pad([tok.encode(c, bos=False, eos=False) for c in captions], 0)}


@pytest.mark.slow
def test_two_flows_equal_one_forward_on_onnxruntime(drawn):
    from mmgpt.contract.artifacts import Artifacts
    from mmgpt.runtime.backends.onnx_runtime import OnnxRuntimeBackend
    artifacts = Artifacts.open(drawn)
    model = artifacts.load_model()
    context = draw_context(artifacts)
    assert two_flows_vs_forward(model, OnnxRuntimeBackend(artifacts), context, vocab=65) <= 1e-5
    assert two_flows_vs_forward(model, TorchBackend(model), context, vocab=65) <= 1e-5


@pytest.mark.slow
def test_chained_greedy_tokens_equal_across_torch_onnxruntime_and_triton(drawn):
    from mmgpt.contract.artifacts import Artifacts
    from mmgpt.runtime.backends import open_backend
    artifacts = Artifacts.open(drawn)
    context = draw_context(artifacts)
    runs = {}
    for name in ("torch", "onnxruntime", "torch-triton"):  # Triton compiled on a GPU, its interpreter without one
        device = KERNEL_DEVICE if name == "torch-triton" else "cpu"
        gen = Generator(open_backend(name, artifacts, device=device), artifacts.tokenizer, max_positions=96,
                        cuda_graph=False, eos_check_interval=100)
        runs[name] = gen.generate(context, max_new_tokens=12)
    tokens = runs["torch"].tokens
    assert tokens.shape == (3, 12) and int(tokens.max()) < 65
    assert torch.equal(runs["onnxruntime"].tokens, tokens) and torch.equal(runs["torch-triton"].tokens.cpu(), tokens)


@pytest.mark.slow
def test_parity_and_manifest_cover_the_new_flows(drawn):
    import json
    manifest = json.loads((drawn / "model.json").read_text())
    assert list(manifest["graphs"]["prefill"]["inputs"]) == ["text_ids", "text_lengths", "input_ids", "input_lengths"]
    assert manifest["graphs"]["prefill"]["inputs"]["text_ids"]["shape"] == ["batch", "text_len"]
    assert manifest["graphs"]["decode"]["outputs"]["logits"]["shape"] == ["batch", 65]
    assert [m["name"] for m in manifest["model_config"]["modalities"]] == ["text", "image"]
    parity = json.loads((drawn / "parity.json").read_text())
    assert parity["passed"] and parity["chained"]["tokens_match"]
    assert {c["shape"].get("text_len") for c in parity["cases"] if c["graph"] == "prefill"} == {1, 6}


def test_init_from_whose_tables_the_config_would_reshape_is_refused(tmp_path):
    from helpers import write_gpt2
    from mmgpt.errors import UserError
    from mmgpt.hf import load_hf
    write_gpt2(tmp_path)
    roles = dict(context=["text"], decoded="pixels")
    ok = load_hf(tmp_path, modalities=[Modality("text", "discrete"), PIXELS], **roles)  # negative control
    assert ok.config.modality("text").vocab_size == ok.config.vocab_size
    with pytest.raises(UserError, match=f"vocab_size=7, but the text tables have vocab_size={ok.config.vocab_size}"):
        load_hf(tmp_path, modalities=[Modality("text", "discrete", vocab_size=7), PIXELS], **roles)


def test_a_modality_the_data_does_not_provide_fails_before_training(tmp_path, capsys):
    from helpers import compose_config, fails, small_train_overrides
    from mmgpt.training import train
    cfg = compose_config("train", ["+experiment=digits_draw", *small_train_overrides(tmp_path, steps=1),
                                   "model.modalities=[{name: text, kind: discrete}, "
                                   "{name: audio, kind: discrete, head: true}]", "model.decoded=audio"])
    fails(lambda: train(cfg), capsys, "model.modalities names 'audio', which the data does not provide")
    assert not (tmp_path / "checkpoints").exists()
