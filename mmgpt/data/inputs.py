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
    .npz / .jsonl features file (texts, where present, are the references), or image files (a glob such as
    'scans/*.png', grouped per sample as trained)."""
    if limit is not None and limit < 1:
        raise UserError(f"limit={limit} must be >= 1 (or null for every sample)")
    if not isinstance(source, str):  # Hydra reads input=[a,b] or input=imgs/[12].png unquoted as a list
        raise UserError(f"input={source}: give one path or glob as a string; quote brackets and spaces for Hydra: "
                        "input='\"imgs/[12].png\"'")
    if source == "digits":
        _, val, _, _ = DigitsTask.from_data_config(data_config).build()
        n = len(val) if limit is None else min(limit, len(val))
        return Inputs(val.prefixes[:n], val.captions[:n], "digits validation split")
    # an existing file is taken as named, so that a name holding `[` or `*` is not read as a pattern
    paths = [source] if Path(source).exists() else sorted(glob.glob(source))
    if not paths:
        raise UserError(f"input={source}: no such file and no file matches it as a glob; give input=digits, a "
                        ".npz / .jsonl of features, or image files (a glob such as 'imgs/*.png')")
    if len(paths) == 1 and paths[0].endswith((".npz", ".jsonl")):
        features, texts = load_features_file(paths[0], texts_required=False)
        return Inputs(torch.from_numpy(features)[:limit], texts[:limit] if texts is not None else None, paths[0])
    prefixes = images_to_prefixes(paths, DigitsTask.from_data_config(data_config))
    return Inputs(torch.from_numpy(prefixes)[:limit], None, f"{len(paths)} image files")
