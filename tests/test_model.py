"""The KV-cache path must compute exactly what one full forward computes."""
import pytest
import torch

from mmgpt.model import GPTConfig, MultimodalGPT, image_to_text
from mmgpt.runtime.backends import write_kv
from mmgpt.runtime.backends.torch_model import TorchBackend


def tiny(encoder="linear", **kw):
    torch.manual_seed(0)
    cfg = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=300, **image_to_text(5, encoder))
    cfg.update(kw)
    return MultimodalGPT(GPTConfig(**cfg)).eval()


@pytest.mark.parametrize("encoder", ["linear", "mlp"])
def test_prefill_plus_decode_steps_equal_full_forward_ragged(encoder):
    model = tiny(encoder)
    B, P, T, N, S = 3, 4, 6, 7, 32
    g = torch.Generator().manual_seed(1)
    prefix = torch.randn(B, P, 5, generator=g)
    lengths = torch.tensor([6, 2, 4])  # ragged, right-padded prompts
    prompt = torch.randint(0, 256, (B, T), generator=g)
    cont = torch.randint(0, 256, (B, N), generator=g)  # the tokens decoded after each prompt
    be = TorchBackend(model)
    with torch.no_grad():
        logits, keys, values = be.prefill(prefix, prompt, lengths)
        k_cache = torch.zeros(2, B, 2, S, 16)
        v_cache = torch.zeros_like(k_cache)
        k_cache[:, :, :, : P + T] = torch.stack(keys)
        v_cache[:, :, :, : P + T] = torch.stack(values)
        pos = (P + lengths)[:, None]
        step_logits = [logits]
        for i in range(N):
            step_logits.append(be.decode(cont[:, i: i + 1], pos, k_cache, v_cache))
            pos = pos + 1
        for b in range(B):  # reference: one full forward over each row's real tokens
            seq = torch.cat([prompt[b, : lengths[b]], cont[b]])[None]
            full, _ = model(prefix[b: b + 1], seq)
            want = full[0, lengths[b] - 1:]  # logits after the prompt, then after each decoded token
            got = torch.stack([s[b] for s in step_logits])
            assert (got - want).abs().max().item() <= 1e-4


def test_loss_is_on_text_tokens_only():
    model = tiny()
    prefix = torch.randn(2, 4, 5)
    ids = torch.randint(0, 256, (2, 5))
    targets = torch.full((2, 5), -100)
    targets[0, 1] = 7
    logits, loss = model(prefix, ids, targets)
    assert logits.shape == (2, 5, 300)  # text positions only: the prefix has no logits
    want = torch.nn.functional.cross_entropy(logits[0, 1][None], torch.tensor([7]))
    assert torch.allclose(loss, want)


def test_write_kv_writes_each_row_at_its_position():
    cache = torch.zeros(2, 3, 1, 8, 2)
    new = [torch.full((3, 1, 1, 2), float(i + 1)) for i in range(2)]
    write_kv(cache, new, torch.tensor([[0], [5], [7]]))
    for b, p in enumerate([0, 5, 7]):
        assert torch.all(cache[:, b, :, p] == torch.tensor([1.0, 2.0])[:, None, None])
    assert cache.sum().item() == 3 * (1 + 2) * 2


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="encoder='conv': choose 'linear' or 'mlp'"):
        GPTConfig(**image_to_text(5, "conv"))
    with pytest.raises(ValueError, match="unknown model config keys"):
        GPTConfig.from_dict({"n_layers": 3})
    with pytest.raises(ValueError, match="written before modalities; re-train it"):
        GPTConfig.from_dict({"prefix_dim": 16, "prefix_encoder": "linear"})
