"""Lightning DataModules over the data sources: what train.py instantiates from conf/data/*.yaml."""
from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from mmgpt.data.captions import CaptionDataset, DeviceBatches, keep_batch
from mmgpt.data.digits import DigitsTask
from mmgpt.data.features import DataFileError, load_features_file, split_features
from mmgpt.tokenizer import ByteTokenizer
from mmgpt.errors import UserError

ON_DEVICE_MAX_BYTES = 1 << 30  # data.on_device=auto keeps a training split up to this size on the GPU


class CaptionDataModule(L.LightningDataModule):
    """Subclasses build `train_set` / `val_set` (untokenized) and set `prefix_len` / `prefix_dim`; `setup`
    tokenizes them. The tokenizer is the byte-level one unless the training run sets another (a pretrained
    model's) before `setup`.

    on_device: "auto" keeps the training split on the GPU when training runs in one process and the split is at
    most ON_DEVICE_MAX_BYTES; otherwise batches come from a DataLoader (pinned memory on a GPU, `num_workers`)."""

    def __init__(self, batch_size: int = 64, num_workers: int = 0, seed: int = 0, on_device: bool | str = "auto"):
        super().__init__()
        if batch_size < 1:
            raise UserError(f"data.batch_size={batch_size} must be >= 1")
        if num_workers < 0:
            raise UserError(f"data.num_workers={num_workers} must be >= 0")
        if on_device not in ("auto", True, False):
            raise UserError(f"data.on_device={on_device!r}: use auto, true or false")
        self.batch_size, self.num_workers, self.seed, self.on_device = batch_size, num_workers, seed, on_device
        self.tokenizer = ByteTokenizer()
        self.train_set: CaptionDataset | None = None
        self.val_set: CaptionDataset | None = None

    def build(self) -> tuple[CaptionDataset, CaptionDataset]:
        raise NotImplementedError

    def setup(self, stage=None):
        if self.train_set is None:
            self.train_set, self.val_set = (ds.tokenize(self.tokenizer) for ds in self.build())

    @property
    def max_caption_tokens(self) -> int:
        """Longest [BOS] caption [EOS] in either split."""
        return max(self.train_set.text_len, self.val_set.text_len)

    def _device(self) -> torch.device:
        return self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")

    def _train_on_device(self, device: torch.device) -> bool:
        single = self.trainer is None or self.trainer.world_size == 1
        if self.on_device is True:
            if device.type != "cuda" or not single:
                raise UserError("data.on_device=true needs one process on a GPU (with several, each process "
                                 "reads its own shard through a DataLoader): use data.on_device=auto")
            return True
        ds = self.train_set
        nbytes = sum(t.numel() * t.element_size() for t in (ds.prefixes, ds.input_ids, ds.targets))
        return self.on_device == "auto" and device.type == "cuda" and single and nbytes <= ON_DEVICE_MAX_BYTES

    def _loader(self, ds, train: bool, device: torch.device):
        return DataLoader(ds, batch_size=self.batch_size, shuffle=train, drop_last=train and len(ds) > self.batch_size,
                          num_workers=self.num_workers, collate_fn=keep_batch, pin_memory=device.type == "cuda",
                          generator=torch.Generator().manual_seed(self.seed), persistent_workers=self.num_workers > 0)

    def train_dataloader(self):
        device = self._device()
        if self._train_on_device(device):
            return DeviceBatches(self.train_set, self.batch_size, device, self.seed)
        return self._loader(self.train_set, train=True, device=device)

    def val_dataloader(self):
        return self._loader(self.val_set, train=False, device=self._device())


class DigitsDataModule(CaptionDataModule):
    def __init__(self, digits_per_sample: int = 2, patch_size: int = 4, train_samples: int = 20000,
                 val_samples: int = 500, val_fraction: float = 0.2, batch_size: int = 64, num_workers: int = 0,
                 seed: int = 0, on_device: bool | str = "auto"):
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, on_device=on_device)
        self.task = DigitsTask(digits_per_sample, patch_size, train_samples, val_samples, val_fraction, seed)
        self.prefix_dim, self.prefix_len = self.task.prefix_dim, self.task.prefix_len
        self.val_image_ids = self.val_pick = None

    def build(self):
        train, val, self.val_pick, self.val_image_ids = self.task.build()
        return train, val


class FeaturesDataModule(CaptionDataModule):
    def __init__(self, path: str, val_fraction: float = 0.1, batch_size: int = 32, num_workers: int = 0,
                 seed: int = 0, on_device: bool | str = "auto"):
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, on_device=on_device)
        self.path = path
        features, texts = load_features_file(path)  # a bad file or split fails here, before training starts
        self.prefix_len, self.prefix_dim = features.shape[1], features.shape[2]
        try:
            self._splits = split_features(features, texts, val_fraction, seed)
        except DataFileError as e:
            raise DataFileError(f"{path}: {e}") from None

    def build(self):
        return self._splits
