"""infer.py's work: artifacts -> backend -> decode loop over the digits validation split or the user's inputs."""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from mmgpt.checkpoint import load_checkpoint, weights_hash
from mmgpt.export.artifacts import Artifacts, find_latest_artifacts
from mmgpt.runtime.backends import TorchBackend
from mmgpt.runtime.generator import Generator
from mmgpt.runtime.sampling import SamplingConfig

BACKENDS = ("auto", "tensorrt", "torch", "torch-triton", "onnxruntime")


@dataclass
class Inputs:
    prefixes: torch.Tensor  # (N, P, F)
    references: list[str] | None
    source: str


def make_backend(name: str, artifacts: Artifacts, compile: bool = False, device: str = "auto",
                 strategy: str | None = None):
    """`auto`: TensorRT where an engine can run here, else torch with the fused Triton kernels on a GPU, else ONNX
    Runtime on the CPU."""
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r}: choose one of {BACKENDS}")
    if name == "auto":
        if torch.cuda.is_available() and artifacts.meta.get("engines"):
            try:
                return make_backend("tensorrt", artifacts, strategy=strategy)
            except Exception as e:  # noqa: BLE001 -- reported, then the next backend is tried
                print(f"backend=auto: TensorRT engines cannot run here ({str(e).splitlines()[0][:160]}); "
                      "trying torch")
        return make_backend("torch-triton" if torch.cuda.is_available() else "onnxruntime", artifacts, compile, device)
    if name == "tensorrt":
        from mmgpt.engines.session import TensorRTBackend
        return TensorRTBackend(artifacts, strategy)
    if name == "onnxruntime":
        from mmgpt.runtime.onnxruntime_backend import OnnxRuntimeBackend
        return OnnxRuntimeBackend(artifacts)
    loaded = load_checkpoint(artifacts.meta["checkpoint"])
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    model = loaded.model.to(artifacts.torch_dtype)
    if weights_hash(model) != artifacts.meta["weights_sha256"]:
        raise ValueError(f"{artifacts.meta['checkpoint']} no longer holds the weights exported to {artifacts.path}; "
                         "re-run `python export.py`")
    if name == "torch-triton":
        if dev.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend=torch-triton needs a CUDA GPU (or TRITON_INTERPRET=1 to emulate it, slowly)")
        from mmgpt.runtime.triton_backend import TritonBackend
        return TritonBackend(model.to(dev), prefix_len=artifacts.meta["prefix_len"])
    return TorchBackend(model.to(dev), compile=compile, prefix_len=artifacts.meta["prefix_len"])


def load_inputs(cfg: DictConfig, artifacts: Artifacts) -> Inputs:
    source = str(cfg.input)
    if source == "digits":
        return _digits_validation(artifacts, cfg.limit)
    paths = sorted(glob.glob(source)) if any(c in source for c in "*?[") else [source]
    if not paths or not Path(paths[0]).exists():
        raise FileNotFoundError(f"input={source}: no such file; give input=digits, a .npz of features, or image "
                                "files (a glob such as 'imgs/*.png')")
    if len(paths) == 1 and paths[0].endswith((".npz", ".jsonl")):
        from mmgpt.data.features import load_features_file
        features, texts = load_features_file(paths[0])
        return Inputs(torch.from_numpy(features)[: cfg.limit], texts[: cfg.limit], paths[0])
    return _images(paths, artifacts)


def _digits_validation(artifacts: Artifacts, limit: int | None) -> Inputs:
    data = dict(artifacts.meta.get("data") or {})
    if not data.get("_target_", "").endswith("DigitsDataModule"):
        raise ValueError(f"{artifacts.path} was not trained on the digits task; pass input=/path/to/features.npz")
    from mmgpt.data.digits import DigitsDataModule
    data.pop("_target_")
    dm = DigitsDataModule(**data)
    dm.setup("validate")  # the same seeded split and samples the training run validated on
    n = len(dm.val_set) if limit is None else min(limit, len(dm.val_set))
    return Inputs(dm.val_set.prefixes[:n], dm.val_set.captions[:n], "digits validation split")


def _images(paths: list[str], artifacts: Artifacts) -> Inputs:
    """Image files -> 8x8 digit-style images (ink high, as in load_digits), patched like training, grouped into
    samples of the trained digits-per-sample."""
    from PIL import Image

    from mmgpt.data.digits import patchify
    data = artifacts.meta.get("data") or {}
    per, patch = data.get("digits_per_sample", 1), data.get("patch_size", 4)
    if len(paths) % per:
        raise ValueError(f"{len(paths)} images, but the model reads {per} per sample: give a multiple of {per}")
    images = []
    for p in paths:
        try:
            img = np.asarray(Image.open(p).convert("L").resize((8, 8), Image.BILINEAR), dtype=np.float32)
        except OSError as e:
            raise ValueError(f"{p}: not a readable image ({e})") from None
        if img.mean() > 127:  # dark digit on a light background: invert so ink is high
            img = 255.0 - img
        images.append(img / 255.0 * 16.0)
    patches = patchify(np.stack(images), patch)  # (N, patches, F)
    prefixes = patches.reshape(len(paths) // per, -1, patches.shape[-1])
    return Inputs(torch.from_numpy(prefixes), None, f"{len(paths)} image files")


def infer(cfg: DictConfig) -> dict:
    path = Path(cfg.artifacts) if cfg.artifacts else find_latest_artifacts(cfg.artifacts_root)
    artifacts = Artifacts(path)
    backend = make_backend(cfg.backend, artifacts, compile=cfg.compile, device=cfg.device,
                           strategy=cfg.engine_strategy)
    generator = Generator(backend, artifacts.tokenizer, capacity_buckets=artifacts.meta["kv_cache"]["capacity_buckets"],
                          max_positions=artifacts.meta["model_config"]["block_size"])
    inputs = load_inputs(cfg, artifacts)
    sampling = SamplingConfig(**cfg.sampling)
    texts, ttft, decode_s, tokens = [], [], 0.0, 0
    for start in range(0, len(inputs.prefixes), cfg.batch_size):
        result = generator.generate(inputs.prefixes[start: start + cfg.batch_size],
                                    max_new_tokens=cfg.max_new_tokens, sampling=sampling)
        texts += result.texts
        ttft.append(result.time_to_first_token_s)
        decode_s += result.decode_time_s
        tokens += result.decode_steps * result.tokens.shape[0]
    report = {"artifacts": str(path), "backend": backend.name, "cuda_graph": generator.use_graph,
              "inputs": inputs.source, "samples": len(texts), "texts": texts,
              "time_to_first_token_ms": 1e3 * float(np.median(ttft)),
              "decode_tokens_per_s": tokens / decode_s if decode_s else 0.0}
    if inputs.references is not None:
        hits = [t == r for t, r in zip(texts, inputs.references)]
        report["exact_match"] = sum(hits) / len(hits)
    for i, t in enumerate(texts[: cfg.show]):
        ref = f"   (reference: {inputs.references[i]!r})" if inputs.references is not None else ""
        print(f"  {i:>3}: {t!r}{ref}")
    print(f"backend {report['backend']} (CUDA graph: {report['cuda_graph']}) on {report['samples']} samples of "
          f"{report['inputs']}")
    if "exact_match" in report:
        print(f"exact_match = {report['exact_match']:.4f}")
    print(f"time to first token {report['time_to_first_token_ms']:.2f} ms (median per batch), "
          f"decode {report['decode_tokens_per_s']:.0f} tok/s")
    return report
