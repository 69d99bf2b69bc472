"""What infer.py reads: the digits validation split a model was trained against, a features file, or image files,
as the model's context."""
from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

import torch

from mmgpt.data.digits import DigitsTask, read_images
from mmgpt.data.features import load_features_file
from mmgpt.errors import UserError
from mmgpt.model import TEXT, GPTConfig


@dataclass
class Inputs:
    context: dict  # context modality -> features (N, P, F), or N token lists
    references: list[str] | None  # expected texts (for a drawn image: the caption it must show), where known
    source: str

    def __len__(self):
        return len(next(iter(self.context.values())))

    def rows(self, start: int, stop: int) -> dict:
        return {name: v[start:stop] for name, v in self.context.items()}


def context_of(values: dict, config: GPTConfig, tokenizer) -> dict:
    """A data source's values (features, texts, token sequences) -> the model's context; text through the
    tokenizer, without BOS / EOS as in training."""
    missing = [n for n in config.context if n not in values]
    if missing:
        raise UserError(f"the input provides {sorted(values)}, but the model's context needs {missing}")
    out = {}
    for m in config.context_modalities:
        v = values[m.name]
        if m.kind == "continuous":
            out[m.name] = torch.as_tensor(v, dtype=torch.float32)
        elif m.name == TEXT:
            out[m.name] = [tokenizer.encode(t, bos=False, eos=False) for t in v]
        else:
            out[m.name] = [[int(i) for i in row] for row in v]
    return out


def load_inputs(source: str, data_config: dict | None, config: GPTConfig, tokenizer,
                limit: int | None = None) -> Inputs:
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
        values = {name: v[:n] for name, v in val.values.items()}
        return Inputs(context_of(values, config, tokenizer), val.references[:n], "digits validation split")
    # an existing file is taken as named, so that a name holding `[` or `*` is not read as a pattern
    paths = [source] if Path(source).exists() else sorted(glob.glob(source))
    if not paths:
        raise UserError(f"input={source}: no such file and no file matches it as a glob; give input=digits, a "
                        ".npz / .jsonl of features, or image files (a glob such as 'imgs/*.png')")
    continuous = [m.name for m in config.context_modalities if m.kind == "continuous"]
    if len(paths) == 1 and paths[0].endswith((".npz", ".jsonl")):
        if len(config.context) != 1 or not continuous:
            raise UserError(f"a features file holds one continuous modality; this model's context is "
                            f"{config.context}")
        features, texts = load_features_file(paths[0], texts_required=False)
        return Inputs({continuous[0]: torch.from_numpy(features)[:limit]},
                      texts[:limit] if texts is not None else None, paths[0])
    if config.context != ["image"]:
        raise UserError(f"image files are the context of a model whose context is the digits image; this one's is "
                        f"{config.context}")
    images = read_images(paths, DigitsTask.from_data_config(data_config))
    return Inputs(context_of({"image": images[:limit]}, config, tokenizer), None, f"{len(paths)} image files")
