"""What every mmgpt data source shares: (prefix, caption) samples, batching, and the DataModule skeleton."""
from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mmgpt.tokenizer import ByteTokenizer

IGNORE_INDEX = -100


class CaptionDataset(Dataset):
    """prefixes (N, P, F) float32 and one caption per row."""

    def __init__(self, prefixes: np.ndarray, captions: list[str], tokenizer: ByteTokenizer):
        assert len(prefixes) == len(captions)
        self.prefixes = torch.as_tensor(np.ascontiguousarray(prefixes), dtype=torch.float32)
        self.captions = list(captions)
        self.tokenizer = tokenizer

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        return self.prefixes[i], self.captions[i]


class Collate:
    """Tokenizes captions as [BOS] caption [EOS], right-pads with PAD, and builds next-token targets that
    ignore padding. The prompt used at generation time is [BOS] alone."""

    def __init__(self, tokenizer: ByteTokenizer):
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


class CaptionDataModule(L.LightningDataModule):
    """Subclasses fill `self.train_set` / `self.val_set` in `setup` and set `prefix_len` / `prefix_dim`."""

    def __init__(self, batch_size: int = 64, num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.tokenizer = ByteTokenizer()
        self.train_set: CaptionDataset | None = None
        self.val_set: CaptionDataset | None = None

    @property
    def max_caption_tokens(self) -> int:
        """Longest [BOS] caption [EOS] in either split."""
        caps = self.train_set.captions + self.val_set.captions
        return max(len(self.tokenizer.encode(c, bos=True, eos=True)) for c in caps)

    def _loader(self, ds, shuffle):
        return DataLoader(ds, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          collate_fn=Collate(self.tokenizer), generator=torch.Generator().manual_seed(self.seed),
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self):
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self):
        return self._loader(self.val_set, shuffle=False)
