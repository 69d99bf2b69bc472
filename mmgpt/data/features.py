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

from mmgpt.data.captions import CaptionDataset
from mmgpt.errors import UserError


class DataFileError(UserError):
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
    arrays = {}
    for name in ("features", "texts"):
        try:
            arrays[name] = z[name]
        except ValueError:  # object arrays need pickle, which a data file must not require
            raise DataFileError(f"{path}: array '{name}' is stored as Python objects; save {name} as a plain "
                                "array: features as float (N, P, F), texts as np.array(list_of_str)") from None
    if not np.issubdtype(arrays["features"].dtype, np.number):
        raise DataFileError(f"{path}: 'features' must be numeric, got dtype {arrays['features'].dtype}")
    return arrays["features"], [str(t) for t in arrays["texts"]]


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


def split_features(features: np.ndarray, texts: list[str], val_fraction: float, seed: int):
    """Seeded split by sample -> train set, validation set."""
    if len(features) < 2:
        raise DataFileError(f"need at least 2 samples to split train / validation, got {len(features)}")
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"data.val_fraction={val_fraction} must lie strictly between 0 and 1")
    perm = np.random.default_rng(seed).permutation(len(texts))
    n_val = min(len(perm) - 1, max(1, int(round(len(perm) * val_fraction))))
    val, train = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    return (CaptionDataset(features[train], [texts[i] for i in train]),
            CaptionDataset(features[val], [texts[i] for i in val]))
