"""The fused Triton decode kernels compute what the PyTorch model computes (Triton's interpreter on a CPU)."""
from dataclasses import replace

import pytest
import torch

from helpers import KERNEL_DEVICE, KERNEL_RTOL, compose_config, require
from mmgpt.model import GPTConfig, MultimodalGPT, RopeScaling, image_to_text, rope_inv_freq
from mmgpt.runtime.backends.torch_model import TorchBackend
from mmgpt.runtime.generator import Generator
from mmgpt.tokenizer import ByteTokenizer

require("triton", "triton is not installed (pip install -e .[dev])")
from mmgpt.runtime.backends.fused_triton import AttentionConfig, GemvConfig, TritonBackend  # noqa: E402

CONFIGS = {"tensor-core": GemvConfig(block_n=16, block_k=32, row_block_n=0),
           "split-k": GemvConfig(block_n=16, block_k=32, min_programs=64, row_block_n=8),
           # batch 1 walks its K slice in 16-wide tiles instead of loading it as one (row_max_k)
           "row-tiles": GemvConfig(block_n=16, block_k=16, min_programs=64, row_block_n=8, row_max_k=16),
           "defaults": GemvConfig()}


def tiny_model(n_embd=32, n_head=2, n_layer=2, block_size=64):
    torch.manual_seed(0)
    return MultimodalGPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                                   vocab_size=300, **image_to_text(5))).eval().to(KERNEL_DEVICE)


def decode_both(model, backend, positions, capacity):
    """One decode step from the same random caches at `positions` (B,) by `backend` and by the torch backend:
    (logits, key cache, value cache) of each."""
    c = model.config
    B = len(positions)
    k = torch.randn(c.n_layer, B, c.n_kv_head, capacity, c.head_dim, device=KERNEL_DEVICE)
    v = torch.randn_like(k)
    k_ref, v_ref, k_tri, v_tri = k.clone(), v.clone(), k.clone(), v.clone()
    ids = torch.randint(0, c.vocab_size, (B, 1), device=KERNEL_DEVICE)
    pos = torch.tensor(positions, device=KERNEL_DEVICE)[:, None]
    with torch.no_grad():
        want = TorchBackend(model).decode(ids, pos, k_ref, v_ref)
        got = backend.decode(ids, pos, k_tri, v_tri)
    return (got, k_tri, v_tri), (want, k_ref, v_ref)


def logits_error(got, want) -> float:
    """The largest difference relative to the reference's scale (at least 1)."""
    return (got - want).abs().max().item() / max(1.0, want.abs().max().item())


def assert_step_matches_torch(model, backend, positions, capacity):
    """One decode step from random caches at `positions` (B,): logits and both caches as the torch backend's."""
    (got, k_tri, v_tri), (want, k_ref, v_ref) = decode_both(model, backend, positions, capacity)
    # relative to each tensor's scale: on a GPU the batched GEMVs' TF32 inputs err in proportion to the values, and
    # the Llama tests' wide weights (std 0.2) give keys of magnitude ~3 where GPT-2's init gives ~0.3
    errors = [logits_error(a, b) for a, b in ((got, want), (k_tri, k_ref), (v_tri, v_ref))]
    print(f"step errors relative to scale: logits {errors[0]:.2e}, keys {errors[1]:.2e}, values {errors[2]:.2e}")
    assert max(errors) <= 10 * KERNEL_RTOL, errors


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("n_embd", [pytest.param(64, marks=pytest.mark.slow), 48])  # 48: K not a multiple of the tiles
def test_decode_step_matches_torch(config, batch, n_embd):
    model = tiny_model(n_embd=n_embd, n_head=n_embd // 16)
    backend = TritonBackend(model, gemv=CONFIGS[config], attention=AttentionConfig(block_s=16))
    assert_step_matches_torch(model, backend, [33, 0, 17][:batch], capacity=40)  # long, empty, middling past


# 16-slot tiles (a tensor-core product's side) over a 128-slot cache; 4 rows x 2 heads, so min_programs=64 asks
# for 8 programs per (row, head)
SPLIT_POSITIONS = {"tile-boundaries": [16, 32, 64, 48],  # each split's run ends exactly on a tile
                   "one-past-boundaries": [17, 33, 65, 113],
                   "shorter-than-one-tile": [1, 5, 15, 3],  # one split works, the others are empty
                   "ragged": [0, 63, 127, 80]}  # empty past, middle, the cache's last slot


@pytest.mark.parametrize("positions", list(SPLIT_POSITIONS))
# 8: one split per tile of the cache (1 is the decode test above)
@pytest.mark.parametrize("max_splits", [pytest.param(2, marks=pytest.mark.slow), 8])
def test_split_cache_attention_matches_torch(positions, max_splits):
    model = tiny_model(block_size=128)  # two layers: the second launch finds the arrival counters reset by the first
    backend = TritonBackend(model, gemv=GemvConfig(block_k=32),
                            attention=AttentionConfig(block_s=16, min_programs=64, max_splits=max_splits))
    assert backend.attention_splits(4, 128) == max_splits
    assert_step_matches_torch(model, backend, SPLIT_POSITIONS[positions], capacity=128)


@pytest.mark.parametrize("gemv", [GemvConfig(gemm_block_n=32, gemm_block_k=16),  # 2 row blocks of 64, 2 K steps
                                  GemvConfig(max_block_b=16, min_programs=256)])  # 5 row blocks, split-K residual
@pytest.mark.slow
def test_batch_tiled_past_64_rows(gemv):
    model = tiny_model(n_layer=1)
    backend = TritonBackend(model, gemv=gemv, attention=AttentionConfig(block_s=16))
    assert backend.max_batch is None
    positions = torch.randint(0, 32, (80,), generator=torch.Generator().manual_seed(0)).tolist()  # 80 rows
    assert_step_matches_torch(model, backend, positions, capacity=32)


def test_attention_stages_fit_shared_memory():
    backend = TritonBackend(tiny_model(n_layer=1))  # head size 16: three stages fit in any dtype
    assert backend.attention_stages(4) == backend.attention_stages(2) == 3
    wide = TritonBackend(MultimodalGPT(GPTConfig(n_layer=1, n_head=2, n_embd=256, block_size=16)))
    wide.shared_memory = 232448  # an H100 / H200: an fp32 cache of 128-wide heads takes one stage, fp16 three
    assert (wide.attention_stages(4), wide.attention_stages(2)) == (1, 3)


def test_tiles_fit_shared_memory_at_every_batch():
    backend = TritonBackend(tiny_model(n_layer=1))
    for cfg in (GemvConfig(), GemvConfig(max_block_b=128, gemm_block_n=256, gemm_block_k=256)):
        for B in range(2, 257):
            for K in (768, 1600, 3072, 6400):
                block_b, block_n, block_k, _ = backend._tiles(B, K, 4, 2, cfg)
                used = cfg.num_stages * block_k * (block_b * 4 + block_n * 2) + 4 * block_b * block_n
                assert used <= 0.9 * backend.shared_memory, (cfg, B, K)
    assert backend._tiles(32, 768, 4, 2, GemvConfig()) == (32, 32, 256, 4)  # the tiles measured up to B = 32
    assert backend._tiles(48, 768, 4, 2, GemvConfig()) == (64, 128, 64, 8)
    assert backend._tiles(256, 768, 4, 2, GemvConfig(max_block_b=128, gemm_block_k=256)) == (128, 128, 32, 8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_programmatic_dependent_launch_changes_nothing():
    model = tiny_model(n_embd=64, n_head=4).cuda().half()
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    c = model.config
    k = torch.randn(c.n_layer, 4, c.n_head, 64, c.head_dim, device="cuda", dtype=torch.half)
    ids, pos = torch.randint(0, 300, (4, 1), device="cuda"), torch.tensor([[0], [9], [40], [63]], device="cuda")
    with torch.no_grad():
        off = TritonBackend(model, pdl=False).decode(ids, pos, k.clone(), k.clone()).clone()
        on = TritonBackend(model, pdl=True).decode(ids, pos, k.clone(), k.clone())
    # split-K atomics add in any order, so the two differ in rounding; a race would differ grossly
    assert (on - off).abs().max().item() <= 1e-2 * off.abs().max().item()


# The Llama family in miniature: Llama 3 (RoPE scaling past position 32, 2 query heads per key/value head), Qwen2
# (q/k/v biases, one key/value head for 4 query heads), SmolLM2-style (tied head; 3 query heads per key/value head,
# so the attention pads its group to 4)
LLAMAS = {"llama": dict(n_head=4, n_kv_head=2, rope_theta=500000.0, tie_weights=False,
                        rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                 original_max_position_embeddings=32)),
          "qwen2": dict(n_head=4, n_kv_head=1, rope_theta=1000000.0, qkv_bias=True, tie_weights=False),
          "smollm2": dict(n_head=6, n_kv_head=2, rope_theta=100000.0, tie_weights=True)}
# small tiles: batch 1 on the FMA kernel, batch 3 on the tensor-core one, split-K residuals, split attention
LLAMA_GEMV = GemvConfig(block_n=16, block_k=32, min_programs=64, row_block_n=8)
LLAMA_ATTENTION = AttentionConfig(block_s=16, min_programs=32, max_splits=4)


def tiny_llama(kind):
    """A 2-layer Llama-family model (head size 16) with weights drawn wide, norms and biases away from their
    init, so that every tensor the kernels read changes the logits."""
    torch.manual_seed(0)
    fields = LLAMAS[kind]
    model = MultimodalGPT(GPTConfig(family="llama", n_layer=2, n_embd=16 * fields["n_head"], intermediate_size=48,
                                    vocab_size=300, block_size=64, **fields, **image_to_text(5)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            torch.nn.init.normal_(p, mean=1.0 if name.endswith("norm.weight") else 0.0, std=0.2)
    return model.eval().to(KERNEL_DEVICE)


@pytest.mark.parametrize("kind", list(LLAMAS))
@pytest.mark.parametrize("positions", [pytest.param([37], marks=pytest.mark.slow), [37, 0, 21]],
                         ids=["batch1", "batch3"])
@pytest.mark.parametrize("row_max_k", [pytest.param(1024, id="one-tile"),  # batch 1's GEMV: see CONFIGS
                                       pytest.param(16, id="row-tiles", marks=pytest.mark.slow)])
def test_llama_decode_step_matches_torch(kind, positions, row_max_k):
    model = tiny_llama(kind)
    backend = TritonBackend(model, gemv=replace(LLAMA_GEMV, row_max_k=row_max_k), attention=LLAMA_ATTENTION)
    assert backend.attention_splits(len(positions), 64) > 1
    assert_step_matches_torch(model, backend, positions, capacity=64)


@pytest.mark.parametrize("wrong", ["rope_theta", "gate_up_swapped"])
def test_llama_decode_step_depends_on_rope_and_swiglu(wrong):
    """Negative controls: a backend with the wrong RoPE frequencies, or with gate and up swapped, computes other
    logits (and, for RoPE, other stored keys) far beyond the tolerance the tests above allow."""
    model = tiny_llama("llama")
    backend = TritonBackend(model, gemv=LLAMA_GEMV, attention=LLAMA_ATTENTION)
    if wrong == "rope_theta":
        backend.inv_freq = rope_inv_freq(GPTConfig(**{**model.config.to_dict(), "rope_theta": 10000.0}),
                                         KERNEL_DEVICE)
    else:
        for layer in backend.layers:
            layer.w_fc, layer.w_up = layer.w_up, layer.w_fc
    (got, k_tri, _), (want, k_ref, _) = decode_both(model, backend, [37, 21], capacity=48)
    assert logits_error(got, want) > 0.5  # of the logits' scale: 25x the tolerance above even on a GPU (2e-2)
    if wrong == "rope_theta":  # the first layer's stored key is rotated by the frequencies alone
        assert (k_tri[0] - k_ref[0]).abs().max().item() > 0.5


@pytest.mark.slow
def test_llama_greedy_generation_matches_torch():
    """A ragged batch after a 4-element image prefix: the fused kernels decode the torch backend's greedy tokens
    (Llama 3 scaling, GQA; the other kinds' steps are checked above)."""
    model = tiny_llama("llama")
    prefix = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(1)).to(KERNEL_DEVICE)
    prompts = [[256], [256, 116, 104], [256, 102, 111, 117, 114]]
    runs = [Generator(backend, ByteTokenizer(), max_positions=64, eos_check_interval=100)
            .generate(prefix, prompts, max_new_tokens=6).tokens
            for backend in (TorchBackend(model), TritonBackend(model, gemv=LLAMA_GEMV, attention=LLAMA_ATTENTION))]
    assert torch.equal(runs[1], runs[0]), runs
    assert len(set(runs[0].flatten().tolist())) > 3  # not a degenerate repetition


def test_rejects_what_the_kernels_cannot_do():
    for n_head, n_embd in ((3, 60), (4, 32)):  # head sizes 20 (not a power of two) and 8 (under a dot's 16)
        with pytest.raises(ValueError, match="power-of-two head size of at least 16"):
            TritonBackend(MultimodalGPT(GPTConfig(n_layer=1, n_head=n_head, n_embd=n_embd, block_size=16)))
    with pytest.raises(ValueError, match="block_s must be a power of two of at least 16"):
        TritonBackend(tiny_model(n_layer=1), attention=AttentionConfig(block_s=8))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="programmatic dependent launch"):
            TritonBackend(tiny_model(n_layer=1), pdl=True)


@pytest.mark.slow  # ~2.5 minutes: 31 decode steps of a 4-layer model in Triton's interpreter
def test_infer_with_fused_kernels_reports_training_accuracy(trained, exported):
    from mmgpt.inference import infer
    report = infer(compose_config("infer", [f"artifacts={exported}", "backend=torch-triton", "show=0", "limit=16"]))
    reference = infer(compose_config("infer", [f"artifacts={exported}", "backend=torch", "show=0", "limit=16"]))
    assert report["backend"] == "torch-triton"
    assert report["texts"] == reference["texts"]
