"""Throughput arithmetic (FLOPs per token, MFU, peak table), the compile switch and activation checkpointing."""
import pytest
import torch

from mmgpt.model import GPTConfig, MultimodalGPT, image_to_text
from mmgpt.throughput import flops_per_token, matmul_params, mfu, peak_flops_for
from mmgpt.training.module import compile_options

TINY = dict(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=8, **image_to_text(3))


def test_flops_per_token_matches_a_hand_count():
    model = MultimodalGPT(GPTConfig(**TINY))
    C = 8
    block = 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + 2 * C + (C * 4 * C + 4 * C) + (4 * C * C + C)  # 872
    wte, ln_f, image_encoder = 11 * C, 2 * C, 3 * C + C  # the tied token table is the head; wpe does no matmul
    n = 2 * block + wte + ln_f + image_encoder
    assert n == 1880 == matmul_params(model)
    attention = 12 * 2 * 2 * 4 * 10  # 12 L H Dh T over a 10-position sequence
    assert flops_per_token(n, 2, 2, 4, seq_len=10) == 6 * 1880 + attention == 13200
    untied = MultimodalGPT(GPTConfig(**TINY, tie_weights=False))
    assert matmul_params(untied) == n  # a separate head counts, the token lookup does not
    assert mfu(1e6, 13200, 1e12) == pytest.approx(0.0132)


def test_mfu_is_unavailable_without_a_peak():
    assert peak_flops_for("cpu") is None and mfu(1e6, 13200, None) is None
    assert peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_for("NVIDIA H200") == 989e12
    assert peak_flops_for("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_for("NVIDIA L40S") == 362e12 and peak_flops_for("NVIDIA L4") == 121e12
    assert peak_flops_for("Some Future GPU") is None


def test_compile_switch():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compile_options("auto", "auto", cpu, 1) is None  # eager on a CPU
    assert compile_options("auto", "auto", cuda, 1) == {"mode": "reduce-overhead", "dynamic": False}
    assert compile_options("auto", "auto", cuda, 2) == {"mode": "default", "dynamic": False}  # DDP: no graphs
    assert compile_options(True, "auto", cpu, 1) == {"mode": "default", "dynamic": False}
    assert compile_options(False, "auto", cuda, 1) is None
    assert compile_options("auto", False, cuda, 1)["mode"] == "default"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        compile_options(True, True, cpu, 1)
    with pytest.raises(ValueError, match="needs module.compile"):
        compile_options(False, True, cuda, 1)
    with pytest.raises(ValueError, match="use auto, true or false"):
        compile_options("yes", "auto", cuda, 1)


def test_activation_checkpointing_gives_the_same_loss_and_grads():
    torch.manual_seed(0)
    model = MultimodalGPT(GPTConfig(**TINY)).train()
    prefix, ids = torch.randn(3, 4, 3), torch.randint(0, 11, (3, 6))
    targets = ids.roll(-1, dims=1)
    runs = {}
    for flag in (False, True):
        model.activation_checkpointing = flag
        model.zero_grad(set_to_none=True)
        calls = []
        hook = model.transformer.h[0].register_forward_pre_hook(lambda *_: calls.append(1))
        loss = model(prefix, ids, targets)[1]
        loss.backward()
        hook.remove()
        runs[flag] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls))
    assert runs[False][2] == 1 and runs[True][2] == 2  # the checkpointed block ran again in the backward pass
    assert torch.allclose(runs[True][0], runs[False][0], atol=1e-5, rtol=0)
    for name, grad in runs[False][1].items():
        assert torch.allclose(runs[True][1][name], grad, atol=1e-5, rtol=0), name
