"""Shared fixtures: composed Hydra configs, a briefly trained digits checkpoint, and its export."""
from __future__ import annotations

import os
import re

import pytest

from helpers import compose_config, small_train_overrides

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def selects_gpu_suite(markexpr: str) -> bool:
    """`pytest -m gpu` (or an expression that asks for gpu tests), not `-m 'not gpu'`."""
    return re.search(r"(?<!not )\bgpu\b", markexpr or "") is not None


def pytest_configure(config):
    # Without a GPU, Triton's interpreter runs the fused kernels on CPU tensors; with one, the kernel tests put their
    # tensors on it (helpers.KERNEL_DEVICE) and the kernels run compiled, as users run them. Set before any test
    # module imports triton, which reads it when a kernel is defined.
    import torch
    if not selects_gpu_suite(config.getoption("markexpr")) and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def trace_once():
    """Tracing is deterministic for a given model, graph, dtype and limits: the many exports of the same tiny
    checkpoints (failure paths, directory handling) reuse the first trace instead of re-running torch.export
    (~8 s a graph on 2 cores). Every export still cleans, checks, saves and verifies its graphs itself."""
    import hashlib

    import onnx

    import mmgpt.export.pipeline as pipeline
    real, cache = pipeline.trace, {}

    def trace(model, graph, dtype, limits):
        digest = hashlib.sha256()
        for name, t in model.state_dict().items():
            digest.update(name.encode() + t.detach().float().numpy().tobytes())
        key = (digest.hexdigest(), graph.name, str(dtype), limits)
        if key not in cache:
            cache[key] = real(model, graph, dtype, limits)
        copy = onnx.ModelProto()
        copy.CopyFrom(cache[key])
        return copy
    pipeline.trace = trace
    yield
    pipeline.trace = real


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A tiny digits model trained for 300 steps (~25 s): captions well above chance, validation at the last step."""
    from mmgpt.training import train
    out = tmp_path_factory.mktemp("train")
    cfg = compose_config("train", ["+experiment=digits", *small_train_overrides(out, steps=300),
                                   "data.batch_size=64", "data.val_samples=64", "data.train_samples=4000"])
    result = train(cfg)
    return result


@pytest.fixture(scope="session")
def exported(trained, tmp_path_factory):
    """fp32 export of the trained checkpoint, with parity checked, no engines."""
    from mmgpt.export.pipeline import export
    root = tmp_path_factory.mktemp("artifacts")
    cfg = compose_config("export", [f"ckpt={trained['last_ckpt']}", f"output_root={root}", "name=digits",
                                    "engine=none"])
    return export(cfg)


@pytest.fixture(scope="session")
def drawn(tmp_path_factory):
    """digits_draw briefly trained (a ragged text context, the image decoded as pixel tokens through its own
    tables) and exported with parity, no engines."""
    from mmgpt.export.pipeline import export
    from mmgpt.training import train
    root = tmp_path_factory.mktemp("draw")
    result = train(compose_config("train", ["+experiment=digits_draw", *small_train_overrides(root / "run", steps=3),
                                            "data.train_samples=64", "data.val_samples=4", "module.max_new_tokens=4"]))
    return export(compose_config("export", [f"ckpt={result['last_ckpt']}", f"output_root={root}", "name=draw",
                                            "engine=none"]))
