"""What infer.py reads: the digits validation split a model was trained against, a features file, or image files."""
from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

import torch

from mmgpt.data.digits import DigitsTask, images_to_prefixes
from mmgpt.data.features import load_features_file
from mmgpt.errors import UserError


@dataclass
class Inputs:
    prefixes: torch.Tensor  # (N, P, F)
    references: list[str] | None  # expected texts, where known
    source: str


def load_inputs(source: str, data_config: dict | None, limit: int | None = None) -> Inputs:
    """source: `digits` (the validation split the training run reported on, rebuilt from its data config), a
    .npz / .jsonl features file, or image files (a glob such as 'scans/*.png', grouped per sample as trained)."""
    if limit is not None and limit < 1:
        raise UserError(f"limit={limit} must be >= 1 (or null for every sample)")
    source = str(source)
    if source == "digits":
        _, val, _, _ = DigitsTask.from_data_config(data_config).build()
        n = len(val) if limit is None else min(limit, len(val))
        return Inputs(val.prefixes[:n], val.captions[:n], "digits validation split")
    paths = sorted(glob.glob(source)) if any(c in source for c in "*?[") else [source]
    if not paths or not Path(paths[0]).exists():
        raise UserError(f"input={source}: no such file; give input=digits, a .npz / .jsonl of features, or "
                                "image files (a glob such as 'imgs/*.png')")
    if len(paths) == 1 and paths[0].endswith((".npz", ".jsonl")):
        features, texts = load_features_file(paths[0])
        return Inputs(torch.from_numpy(features)[:limit], texts[:limit], paths[0])
    prefixes = images_to_prefixes(paths, DigitsTask.from_data_config(data_config))
    return Inputs(torch.from_numpy(prefixes)[:limit], None, f"{len(paths)} image files")
