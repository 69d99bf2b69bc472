"""The decode loop over every CPU backend: exact greedy tokens, sampling, errors, and infer.py."""
import numpy as np
import pytest
import torch

from helpers import compose_config
from mmgpt.checkpoint import load_checkpoint
from mmgpt.contract.artifacts import Artifacts
from mmgpt.runtime.backends.torch_model import TorchBackend
from mmgpt.runtime.generator import Generator
from mmgpt.errors import UserError
from mmgpt.inference import infer
from mmgpt.runtime.backends.onnx_runtime import OnnxRuntimeBackend
from mmgpt.runtime.sampling import SamplingConfig

MAX_NEW = 24


@pytest.fixture(scope="module")
def setup(trained, exported):
    loaded = load_checkpoint(trained["last_ckpt"])
    g = torch.Generator().manual_seed(3)
    prefix = torch.rand(3, 8, 16, generator=g)
    tok = loaded.tokenizer
    prompts = [[tok.bos_id], [tok.bos_id, *tok.encode("th", bos=False)], [tok.bos_id, *tok.encode("one ", bos=False)]]
    return loaded, Artifacts.open(exported), prefix, prompts


def reference_greedy(model, prefix, prompt, n, eos):
    """No cache at all: one full forward over the whole sequence for every token."""
    seq = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(prefix[None], torch.tensor([seq]))
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            seq.append(nxt)
            if nxt == eos:
                break
    return out


def _rows(result, eos):
    rows = []
    for row in result.tokens.tolist():
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows


@pytest.mark.parametrize("backend_name", ["torch", "onnxruntime"])
def test_backends_reproduce_reference_greedy_tokens_on_ragged_batch(setup, backend_name):
    loaded, artifacts, prefix, prompts = setup
    backend = TorchBackend(loaded.model) if backend_name == "torch" else OnnxRuntimeBackend(artifacts)
    gen = Generator(backend, loaded.tokenizer, max_positions=128, cuda_graph=False, eos_check_interval=4)
    result = gen.generate(prefix, prompts, max_new_tokens=MAX_NEW)
    eos = loaded.tokenizer.eos_id
    want = [reference_greedy(loaded.model, prefix[b], prompts[b], MAX_NEW, eos) for b in range(3)]
    assert _rows(result, eos) == want
    assert result.backend == backend_name and not result.cuda_graph


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(setup):
    loaded, _, prefix, prompts = setup
    gen = Generator(TorchBackend(loaded.model), loaded.tokenizer, max_positions=128, cuda_graph=False)
    # hot enough that a trained (confident) model still varies between seeds
    hot = SamplingConfig(temperature=5.0, top_k=50, top_p=0.99, seed=11)
    a = gen.generate(prefix, prompts, max_new_tokens=MAX_NEW, sampling=hot).tokens
    b = gen.generate(prefix, prompts, max_new_tokens=MAX_NEW, sampling=hot).tokens
    others = [gen.generate(prefix, prompts, max_new_tokens=MAX_NEW,
                           sampling=SamplingConfig(temperature=5.0, top_k=50, top_p=0.99, seed=s)).tokens
              for s in (12, 13, 14)]
    assert torch.equal(a, b)
    assert any(not torch.equal(a, c) for c in others)  # a confident model may repeat itself for one seed
    greedy = gen.generate(prefix, prompts, max_new_tokens=MAX_NEW).tokens
    top1 = gen.generate(prefix, prompts, max_new_tokens=MAX_NEW,
                        sampling=SamplingConfig(temperature=1.0, top_k=1, seed=5)).tokens
    tiny_p = gen.generate(prefix, prompts, max_new_tokens=MAX_NEW,
                          sampling=SamplingConfig(temperature=1.0, top_p=1e-6, seed=5)).tokens
    assert torch.equal(top1, greedy) and torch.equal(tiny_p, greedy)


def test_sampling_draws_from_the_distribution():
    from mmgpt.runtime.sampling import sample
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1, 1e-9]])).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    freq = torch.bincount(sample(logits, SamplingConfig(temperature=1.0), g), minlength=4).float() / 20000
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1, 0.0]), atol=0.015)
    top2 = torch.bincount(sample(logits, SamplingConfig(temperature=1.0, top_k=2), g), minlength=4)
    assert top2[2:].sum() == 0


def test_bad_inputs_fail_before_anything_runs(setup):
    loaded, _, prefix, prompts = setup
    backend = TorchBackend(loaded.model, context_lens={"image": 8})
    gen = Generator(backend, loaded.tokenizer, max_positions=128, cuda_graph=False)
    with pytest.raises(ValueError, match=r"= 133 exceeds the largest cache capacity 128; lower max_new_tokens to 115"):
        gen.generate(prefix, prompts, max_new_tokens=120)
    with pytest.raises(ValueError, match=r"image features have F=15, but the model expects F=16"):
        gen.generate(prefix[..., :15], prompts)
    with pytest.raises(ValueError, match=r"image length P=7, but the exported graphs expect P=8"):
        gen.generate(prefix[:, :7], prompts)
    with pytest.raises(ValueError, match=r"image features must be a float tensor"):
        gen.generate(prefix.long(), prompts)
    with pytest.raises(ValueError, match=r"image features must be a \(B, P, F\) tensor with B >= 1 and F >= 1, got "
                                         r"shape \(8, 16\)"):
        gen.generate(prefix[0], prompts)
    backend.max_batch = 2
    with pytest.raises(ValueError, match=r"batch 3 exceeds the torch backend's max batch 2"):
        gen.generate(prefix, prompts)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    assert gen._engines == {}  # nothing was allocated


def _infer_cfg(exported, *extra):
    return compose_config("infer", [f"artifacts={exported}", "show=0", *extra])


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_infer_reports_training_validation_accuracy(trained, exported, backend):
    report = infer(_infer_cfg(exported, f"backend={backend}"))
    assert report["samples"] == 64
    assert report["exact_match"] == pytest.approx(trained["metrics"]["val/exact_match"], abs=1e-9)
    assert report["backend"] == backend and report["decode_tokens_per_s"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a CUDA GPU, auto picks torch-triton (tests/test_gpu.py)")
def test_infer_auto_on_cpu_picks_onnxruntime(exported):
    assert infer(_infer_cfg(exported, "limit=4"))["backend"] == "onnxruntime"


def test_infer_on_user_features_and_images(exported, tmp_path):
    from PIL import Image
    from sklearn.datasets import load_digits

    from mmgpt.data.digits import patchify
    digits = load_digits()
    prefixes = patchify(digits.images[:8], 4).reshape(4, 8, 16)
    np.savez(tmp_path / "f.npz", features=prefixes, texts=np.array(["x"] * 4))
    report = infer(_infer_cfg(exported, f"input={tmp_path}/f.npz"))
    assert report["samples"] == 4 and report["exact_match"] == 0.0
    for i in range(4):  # dark digit on white, as a scanned image would be
        Image.fromarray((255 - digits.images[i] * 255 / 16).astype(np.uint8)).resize((32, 32)).save(
            tmp_path / f"img{i}.png")
    report = infer(_infer_cfg(exported, f"input={tmp_path}/img*.png"))
    assert report["samples"] == 2 and "exact_match" not in report
    with pytest.raises(ValueError, match="multiple of 2"):
        infer(_infer_cfg(exported, f"input={tmp_path}/img0.png"))
    with pytest.raises(UserError, match="no such file"):
        infer(_infer_cfg(exported, f"input={tmp_path}/none.npz"))
