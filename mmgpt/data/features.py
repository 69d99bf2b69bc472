"""Bring your own modality: precomputed feature arrays (CLIP vectors, audio frames, ...) with one text each.

Accepted files (README "Your own data"):
  .npz   -- arrays `features` float (N, P, F) and `texts` (N,) strings
  .jsonl -- one object per line: {"features": [[f, ...], ...] (P x F), "text": "..."}
Every sample must have the same P and F. The split is by sample, seeded.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mmgpt.data.common import CaptionDataModule, CaptionDataset


class DataFileError(ValueError):
    """A user data file is missing or malformed; the message names the file and what to fix."""


def load_features_file(path) -> tuple[np.ndarray, list[str]]:
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"{path}: no such data file. Pass data.path=/absolute/path/to/file.npz or .jsonl")
    if path.suffix == ".npz":
        features, texts = _load_npz(path)
    elif path.suffix == ".jsonl":
        features, texts = _load_jsonl(path)
    else:
        raise DataFileError(f"{path}: unsupported extension {path.suffix!r}; use .npz or .jsonl")
    if features.ndim != 3 or features.shape[0] == 0:
        raise DataFileError(f"{path}: features must have shape (N, P, F) with N >= 1, got {features.shape}")
    if not np.isfinite(features).all():
        raise DataFileError(f"{path}: features contain NaN or infinite values")
    if len(texts) != len(features):
        raise DataFileError(f"{path}: {len(features)} feature rows but {len(texts)} texts; they must pair up")
    return features.astype(np.float32), texts


def _load_npz(path):
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # zip / pickle errors carry no file name
        raise DataFileError(f"{path}: not a readable .npz file ({e})") from None
    missing = {"features", "texts"} - set(z.files)
    if missing:
        raise DataFileError(f"{path}: missing array(s) {sorted(missing)}; found {sorted(z.files)}. "
                            "Save with np.savez(path, features=..., texts=np.array([...]))")
    if not np.issubdtype(z["features"].dtype, np.number):
        raise DataFileError(f"{path}: 'features' must be numeric, got dtype {z['features'].dtype}")
    return z["features"], [str(t) for t in z["texts"]]


def _load_jsonl(path):
    features, texts, shape = [], [], None
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFileError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or "features" not in row or "text" not in row:
                raise DataFileError(f"{where}: each line needs keys 'features' (P x F list) and 'text'")
            try:
                x = np.asarray(row["features"], dtype=np.float32)
            except (ValueError, TypeError):
                raise DataFileError(f"{where}: 'features' must be a rectangular P x F list of numbers") from None
            if x.ndim != 2:
                raise DataFileError(f"{where}: 'features' must be P x F (2-D), got {x.ndim}-D")
            if shape is not None and x.shape != shape:
                raise DataFileError(f"{where}: features shape {x.shape} differs from the first line's {shape}")
            if not isinstance(row["text"], str):
                raise DataFileError(f"{where}: 'text' must be a string")
            shape = x.shape
            features.append(x)
            texts.append(row["text"])
    if not features:
        raise DataFileError(f"{path}: no samples in the file")
    return np.stack(features), texts


class FeaturesDataModule(CaptionDataModule):
    def __init__(self, path: str, val_fraction: float = 0.1, batch_size: int = 32, num_workers: int = 0,
                 seed: int = 0, on_device: bool | str = "auto"):
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, on_device=on_device)
        self.path, self.val_fraction = path, val_fraction
        features, self.texts = load_features_file(path)  # validate early: a bad file fails before training
        if len(features) < 2:
            raise DataFileError(f"{path}: need at least 2 samples to split train / validation, got {len(features)}")
        self.features = features
        self.prefix_len, self.prefix_dim = features.shape[1], features.shape[2]

    def setup(self, stage=None):
        if self.train_set is not None:
            return
        perm = np.random.default_rng(self.seed).permutation(len(self.texts))
        n_val = max(1, int(round(len(perm) * self.val_fraction)))
        val, train = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        self.train_set = CaptionDataset(self.features[train], [self.texts[i] for i in train], self.tokenizer)
        self.val_set = CaptionDataset(self.features[val], [self.texts[i] for i in val], self.tokenizer)
