"""The fused Triton decode kernels compute what the PyTorch model computes (Triton's interpreter on a CPU)."""
import pytest
import torch

from helpers import compose_config
from mmgpt.model import GPTConfig, MultimodalGPT
from mmgpt.runtime.backends.torch_model import TorchBackend

pytest.importorskip("triton", reason="triton is not installed (pip install -e .[dev])")
from mmgpt.runtime.backends.fused_triton import GemvConfig, TritonBackend  # noqa: E402

CONFIGS = {"tensor-core": GemvConfig(block_n=16, block_k=32, row_block_n=0),
           "split-k": GemvConfig(block_n=16, block_k=32, min_programs=64, row_block_n=8),
           "defaults": GemvConfig()}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("n_embd", [64, 48])  # 48: K not a multiple of the tiles
def test_decode_step_matches_torch(config, batch, n_embd):
    torch.manual_seed(0)
    model = MultimodalGPT(GPTConfig(n_layer=2, n_head=n_embd // 16, n_embd=n_embd, block_size=64, prefix_dim=5,
                                    vocab_size=300)).eval()
    S, H = 40, n_embd // 16
    k = torch.randn(2, batch, H, S, 16)
    v = torch.randn_like(k)
    ids = torch.randint(0, 256, (batch, 1))
    pos = torch.tensor([[33], [0], [17]])[:batch]  # a long, an empty and a middling past
    k_ref, v_ref, k_tri, v_tri = k.clone(), v.clone(), k.clone(), v.clone()
    with torch.no_grad():
        want = TorchBackend(model).decode(ids, pos, k_ref, v_ref)
        got = TritonBackend(model, gemv=CONFIGS[config], block_s=16).decode(ids, pos, k_tri, v_tri)
    assert (got - want).abs().max().item() <= 1e-4
    assert torch.allclose(k_tri, k_ref, atol=1e-5) and torch.allclose(v_tri, v_ref, atol=1e-5)


def test_rejects_what_the_kernels_cannot_do():
    with pytest.raises(ValueError, match="power-of-two head size"):
        TritonBackend(MultimodalGPT(GPTConfig(n_layer=1, n_head=3, n_embd=60, block_size=16)))


def test_infer_with_fused_kernels_reports_training_accuracy(trained, exported):
    from mmgpt.inference import infer
    report = infer(compose_config("infer", [f"artifacts={exported}", "backend=torch-triton", "show=0", "limit=16"]))
    reference = infer(compose_config("infer", [f"artifacts={exported}", "backend=torch", "show=0", "limit=16"]))
    assert report["backend"] == "torch-triton"
    assert report["texts"] == reference["texts"]
