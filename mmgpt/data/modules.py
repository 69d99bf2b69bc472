"""Lightning DataModules over the data sources: what train.py instantiates from conf/data/*.yaml."""
from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from mmgpt.data.captions import CaptionDataset, Collate
from mmgpt.data.digits import DigitsTask
from mmgpt.data.features import DataFileError, load_features_file, split_features
from mmgpt.tokenizer import ByteTokenizer


class CaptionDataModule(L.LightningDataModule):
    """Subclasses fill `train_set` / `val_set` in `setup` and set `prefix_len` / `prefix_dim`. The tokenizer is
    the byte-level one unless the training run sets another (a pretrained model's) before `setup`."""

    def __init__(self, batch_size: int = 64, num_workers: int = 0, seed: int = 0):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} must be >= 1")
        if num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers} must be >= 0")
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.tokenizer = ByteTokenizer()
        self.train_set: CaptionDataset | None = None
        self.val_set: CaptionDataset | None = None

    def setup(self, stage=None):
        """Sources that read their data when constructed have nothing left to do here."""

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


class DigitsDataModule(CaptionDataModule):
    def __init__(self, digits_per_sample: int = 2, patch_size: int = 4, train_samples: int = 20000,
                 val_samples: int = 500, val_fraction: float = 0.2, batch_size: int = 64, num_workers: int = 0,
                 seed: int = 0):
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.task = DigitsTask(digits_per_sample, patch_size, train_samples, val_samples, val_fraction, seed)
        self.prefix_dim, self.prefix_len = self.task.prefix_dim, self.task.prefix_len
        self.val_image_ids = self.val_pick = None

    def setup(self, stage=None):
        if self.train_set is None:
            self.train_set, self.val_set, self.val_pick, self.val_image_ids = self.task.build()


class FeaturesDataModule(CaptionDataModule):
    def __init__(self, path: str, val_fraction: float = 0.1, batch_size: int = 32, num_workers: int = 0,
                 seed: int = 0):
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.path = path
        features, texts = load_features_file(path)  # a bad file or split fails here, before training starts
        self.prefix_len, self.prefix_dim = features.shape[1], features.shape[2]
        try:
            self.train_set, self.val_set = split_features(features, texts, val_fraction, seed)
        except DataFileError as e:
            raise DataFileError(f"{path}: {e}") from None
