"""Bring your own modality: precomputed feature arrays (CLIP vectors, audio frames, ...) with one text each.

Accepted files (README "Your own data"):
  .npz   -- arrays `features` float (N, P, F) and `texts` (N,) strings
  .jsonl -- one object per line: {"features": [[f, ...], ...] (P x F), "text": "..."}
Every sample must have the same P and F. The split is by sample, seeded. infer.py also takes files without texts
(it captions them and reports no metric).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mmgpt.data.samples import Samples
from mmgpt.errors import UserError


class DataFileError(UserError):
    """A user data file is missing or malformed; the message names the file and what to fix."""


def load_features_file(path, texts_required: bool = True) -> tuple[np.ndarray, list[str] | None]:
    """-> features (N, P, F) float32, texts (N,). Unlabelled features (no texts; infer.py captions them) only
    where `texts_required` is False: texts is then None."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"{path}: no such data file. Pass data.path=/absolute/path/to/file.npz or .jsonl")
    if path.suffix == ".npz":
        features, texts = _load_npz(path, texts_required)
    elif path.suffix == ".jsonl":
        features, texts = _load_jsonl(path, texts_required)
    else:
        raise DataFileError(f"{path}: unsupported extension {path.suffix!r}; use .npz or .jsonl")
    if features.ndim != 3 or min(features.shape) < 1:
        raise DataFileError(f"{path}: features must have shape (N, P, F) with every dim >= 1, got {features.shape}")
    with np.errstate(all="ignore"):
        features = features.astype(np.float32)  # checked in the dtype that runs: 1e39 is finite only in float64
    if not np.isfinite(features).all():
        raise DataFileError(f"{path}: features contain NaN or infinite values (as float32: |x| < 3.4e38)")
    if texts is not None and len(texts) != len(features):
        raise DataFileError(f"{path}: {len(features)} feature rows but {len(texts)} texts; they must pair up")
    return features, texts


def _load_npz(path, texts_required: bool):
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # zip / pickle errors carry no file name
        raise DataFileError(f"{path}: not a readable .npz file ({e})") from None
    missing = ({"features", "texts"} if texts_required else {"features"}) - set(z.files)
    if missing:
        raise DataFileError(f"{path}: missing array(s) {sorted(missing)}; found {sorted(z.files)}. "
                            "Save with np.savez(path, features=..., texts=np.array([...]))")
    arrays = {"texts": None}
    for name in ("features", "texts") if "texts" in z.files else ("features",):
        try:
            arrays[name] = z[name]
        except ValueError:  # object arrays need pickle, which a data file must not require
            raise DataFileError(f"{path}: array '{name}' is stored as Python objects; save {name} as a plain "
                                "array: features as float (N, P, F), texts as np.array(list_of_str)") from None
    if not np.issubdtype(arrays["features"].dtype, np.number):
        raise DataFileError(f"{path}: 'features' must be numeric, got dtype {arrays['features'].dtype}")
    texts = arrays["texts"]
    return arrays["features"], None if texts is None else [str(t) for t in texts]


def _load_jsonl(path, texts_required: bool):
    features, texts, shape = [], [], None
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise DataFileError(f"{path}: cannot be read ({e.strerror or e})") from None
    for lineno, raw in enumerate(lines, 1):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataFileError(f"{where}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                "save the file as UTF-8") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFileError(f"{where}: not valid JSON ({e.msg})") from None
        needs_text = texts_required or bool(texts)  # unlabelled files: no line has a text
        if not isinstance(row, dict) or "features" not in row or ("text" not in row and needs_text) or \
                ("text" in row and features and not texts):
            raise DataFileError(f"{where}: each line needs keys 'features' (P x F list) and 'text'"
                                f"{'' if texts_required else ' (or, on every line, no text)'}")
        try:
            x = np.asarray(row["features"], dtype=np.float32)
        except (ValueError, TypeError):
            raise DataFileError(f"{where}: 'features' must be a rectangular P x F list of numbers") from None
        if x.ndim != 2:
            raise DataFileError(f"{where}: 'features' must be P x F (2-D), got {x.ndim}-D")
        if shape is not None and x.shape != shape:
            raise DataFileError(f"{where}: features shape {x.shape} differs from the first line's {shape}")
        if "text" in row and not isinstance(row["text"], str):
            raise DataFileError(f"{where}: 'text' must be a string")
        shape = x.shape
        features.append(x)
        if "text" in row:
            texts.append(row["text"])
    if not features:
        raise DataFileError(f"{path}: no samples in the file")
    return np.stack(features), texts if texts else None


def split_features(features: np.ndarray, texts: list[str], val_fraction: float, seed: int):
    """Seeded split by sample -> train set, validation set."""
    if len(features) < 2:
        raise DataFileError(f"need at least 2 samples to split train / validation, got {len(features)}")
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"data.val_fraction={val_fraction} must lie strictly between 0 and 1")
    perm = np.random.default_rng(seed).permutation(len(texts))
    n_val = min(len(perm) - 1, max(1, int(round(len(perm) * val_fraction))))
    val, train = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    return tuple(Samples({"features": features[ids], "text": [texts[i] for i in ids]}, [texts[i] for i in ids])
                 for ids in (train, val))
