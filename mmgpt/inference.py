"""infer.py's work: artifacts -> backend -> decode loop over the digits validation split or the user's inputs.
Text is printed as text, another decoded modality as its tokens; drawn digits are also written as PNG images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from mmgpt.contract.artifacts import Artifacts, find_latest_artifacts
from mmgpt.data.digits import DigitsTask
from mmgpt.data.inputs import load_inputs
from mmgpt.model import TEXT
from mmgpt.runtime.backends import open_backend
from mmgpt.runtime.generator import Generator
from mmgpt.runtime.sampling import SamplingConfig
from mmgpt.errors import UserError


def check_infer_config(cfg: DictConfig) -> SamplingConfig:
    """Everything in the command line that can be wrong, before any model is loaded."""
    if cfg.images_dir is not None and not isinstance(cfg.images_dir, str):
        raise UserError(f"images_dir={cfg.images_dir!r} must be a directory path")
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
    config = m.config
    inputs = load_inputs(cfg.input, m.data, config, artifacts.tokenizer, cfg.limit)  # before any model is loaded
    backend = open_backend(cfg.backend, artifacts, device=cfg.device, compile=cfg.compile,
                           strategy=cfg.engine_strategy)
    generator = Generator(backend, artifacts.tokenizer, capacity_buckets=m.capacity_buckets,
                          max_positions=config.block_size)
    batch = min(cfg.batch_size, backend.max_batch or cfg.batch_size)  # an engine profile's max batch, if any
    print(f"artifacts {artifacts.path}  backend {backend.name} on {backend.device}  batches of {batch}")
    texts, sequences, ttft, decode_s, tokens = [], [], [], 0.0, 0
    for start in range(0, len(inputs), batch):
        result = generator.generate(inputs.rows(start, start + batch), max_new_tokens=cfg.max_new_tokens,
                                    sampling=sampling)
        texts += result.texts
        sequences += result.sequences
        ttft.append(result.time_to_first_token_s)
        decode_s += result.decode_time_s
        tokens += result.decode_steps * result.tokens.shape[0]
    text = config.decoded == TEXT
    shown = texts if text else sequences
    report = {"artifacts": str(artifacts.path), "backend": backend.name, "cuda_graph": generator.use_graph,
              "inputs": inputs.source, "samples": len(sequences), "batch_size": batch, "decoded": config.decoded,
              "texts": texts, "sequences": sequences, "time_to_first_token_ms": 1e3 * float(np.median(ttft)),
              "decode_tokens_per_s": tokens / decode_s if decode_s else 0.0}
    drawn = config.decoded == "image" and m.data is not None and "image_tokens" in m.data
    if drawn:
        task = DigitsTask.from_data_config(m.data)
        if inputs.references is not None:
            reader = task.reader()
            hits = reader.recognised(task.drawn_images(sequences), inputs.references)
            report.update(recognised=sum(hits) / len(hits), reader_held_out_accuracy=reader.held_out_accuracy)
        if cfg.images_dir:
            report["images"] = write_images(task.drawn_images(sequences), Path(cfg.images_dir))
    elif inputs.references is not None and text:
        hits = [t == r for t, r in zip(texts, inputs.references)]
        report["exact_match"] = sum(hits) / len(hits)
    for i, t in enumerate(shown[: cfg.show]):
        ref = f"   (reference: {inputs.references[i]!r})" if inputs.references is not None else ""
        print(f"  {i:>3}: {t!r}{ref}")
    print(f"backend {report['backend']} (CUDA graph: {report['cuda_graph']}) on {report['samples']} samples of "
          f"{report['inputs']}")
    if "exact_match" in report:
        print(f"exact_match = {report['exact_match']:.4f}")
    if "recognised" in report:
        print(f"recognised = {report['recognised']:.4f} (the reader's own accuracy on held-out real images: "
              f"{report['reader_held_out_accuracy']:.4f})")
    if "images" in report:
        print(f"images: {len(report['images']) - 1} PNGs and a grid in {cfg.images_dir}")
    print(f"time to first token {report['time_to_first_token_ms']:.2f} ms (median per batch), "
          f"decode {report['decode_tokens_per_s']:.0f} tok/s")
    return report


def write_images(images: np.ndarray, directory: Path) -> list[str]:
    """Each drawn sample (k, 8, 8) as a PNG (its digits side by side, 8x upscaled) and all of them as grid.png."""
    directory.mkdir(parents=True, exist_ok=True)
    tiles = [np.concatenate(list(digits), axis=1) for digits in images]  # (8, 8k)
    scale, paths = 8, []
    for i, tile in enumerate(tiles):
        path = directory / f"{i:04d}.png"
        _png(tile, scale).save(path)
        paths.append(str(path))
    cols = max(1, min(10, len(tiles)))
    rows = -(-len(tiles) // cols)
    h, w = tiles[0].shape
    grid = np.zeros((rows * (h + 1), cols * (w + 1)))
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        grid[r * (h + 1): r * (h + 1) + h, c * (w + 1): c * (w + 1) + w] = tile
    _png(grid, scale).save(directory / "grid.png")
    return paths + [str(directory / "grid.png")]


def _png(values: np.ndarray, scale: int):
    from PIL import Image
    ink = (255 - values / 16.0 * 255).clip(0, 255).astype(np.uint8)  # dark ink on white, as a scan
    return Image.fromarray(ink).resize((values.shape[1] * scale, values.shape[0] * scale), Image.NEAREST)
