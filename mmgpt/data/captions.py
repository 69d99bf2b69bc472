"""What every mmgpt data source shares: (prefix, caption) samples and their batching. No Lightning here, so the
inference path can read data without the training stack."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

IGNORE_INDEX = -100


class CaptionDataset(Dataset):
    """prefixes (N, P, F) float32 and one caption per row."""

    def __init__(self, prefixes: np.ndarray, captions: list[str]):
        if len(prefixes) != len(captions):
            raise ValueError(f"{len(prefixes)} prefixes but {len(captions)} captions; they must pair up")
        self.prefixes = torch.as_tensor(np.ascontiguousarray(prefixes), dtype=torch.float32)
        self.captions = list(captions)

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        return self.prefixes[i], self.captions[i]


class Collate:
    """Tokenizes captions as [BOS] caption [EOS], right-pads with PAD, and builds next-token targets that
    ignore padding. The prompt used at generation time is [BOS] alone."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def __call__(self, batch):
        prefixes, captions = zip(*batch)
        ids = [self.tok.encode(c, bos=True, eos=True) for c in captions]
        T = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), T), self.tok.pad_id, dtype=torch.long)
        targets = torch.full((len(ids), T), IGNORE_INDEX, dtype=torch.long)
        for b, x in enumerate(ids):
            input_ids[b, : len(x)] = torch.tensor(x)
            targets[b, : len(x) - 1] = torch.tensor(x[1:])  # position t predicts token t+1
        return {"prefix": torch.stack(prefixes), "input_ids": input_ids, "targets": targets, "captions": list(captions)}
