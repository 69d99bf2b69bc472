"""infer.py's work: artifacts -> backend -> decode loop over the digits validation split or the user's inputs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from mmgpt.contract.artifacts import Artifacts, find_latest_artifacts
from mmgpt.data.inputs import load_inputs
from mmgpt.runtime.backends import open_backend
from mmgpt.runtime.generator import Generator
from mmgpt.runtime.sampling import SamplingConfig
from mmgpt.errors import UserError


def check_infer_config(cfg: DictConfig) -> SamplingConfig:
    """Everything in the command line that can be wrong, before any model is loaded."""
    for key in ("batch_size", "max_new_tokens", "show"):
        value = cfg[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "show" else 1):
            raise UserError(f"{key}={value!r} must be an integer >= {0 if key == 'show' else 1}")
    if cfg.limit is not None and (not isinstance(cfg.limit, int) or cfg.limit < 1):
        raise UserError(f"limit={cfg.limit!r} must be an integer >= 1 (or null for every sample)")
    return SamplingConfig.from_dict(OmegaConf.to_container(cfg.sampling, resolve=True))


def infer(cfg: DictConfig) -> dict:
    sampling = check_infer_config(cfg)
    path = Path(cfg.artifacts) if cfg.artifacts else find_latest_artifacts(cfg.artifacts_root)
    artifacts = Artifacts.open(path)
    m = artifacts.manifest
    inputs = load_inputs(cfg.input, m.data, cfg.limit)  # a bad input file fails before any model is loaded
    backend = open_backend(cfg.backend, artifacts, device=cfg.device, compile=cfg.compile,
                           strategy=cfg.engine_strategy)
    generator = Generator(backend, artifacts.tokenizer, capacity_buckets=m.capacity_buckets,
                          max_positions=m.config.block_size)
    batch = min(cfg.batch_size, backend.max_batch or cfg.batch_size)  # an engine profile's max batch, if any
    print(f"artifacts {artifacts.path}  backend {backend.name} on {backend.device}  batches of {batch}")
    texts, ttft, decode_s, tokens = [], [], 0.0, 0
    for start in range(0, len(inputs.prefixes), batch):
        result = generator.generate(inputs.prefixes[start: start + batch], max_new_tokens=cfg.max_new_tokens,
                                    sampling=sampling)
        texts += result.texts
        ttft.append(result.time_to_first_token_s)
        decode_s += result.decode_time_s
        tokens += result.decode_steps * result.tokens.shape[0]
    report = {"artifacts": str(artifacts.path), "backend": backend.name, "cuda_graph": generator.use_graph,
              "inputs": inputs.source, "samples": len(texts), "batch_size": batch, "texts": texts,
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
