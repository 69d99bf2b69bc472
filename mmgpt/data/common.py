"""What every mmgpt data source shares: (prefix, caption) samples, batching, and the DataModule skeleton.

Captions are tokenized once, when a dataset is built, and padded to that dataset's longest caption; training
drops the last partial batch. So every training batch has the same shape, which torch.compile and CUDA graphs
need, and a batch costs one indexing per tensor instead of per-sample Python work.
"""
from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mmgpt.tokenizer import ByteTokenizer

IGNORE_INDEX = -100
ON_DEVICE_MAX_BYTES = 1 << 30  # data.on_device=auto keeps a training split up to this size on the GPU


def tokenize_captions(tok: ByteTokenizer, captions: list[str]):
    """[BOS] caption [EOS], right-padded with PAD to the longest -> input_ids (N, T), and next-token targets (N, T)
    that ignore padding. The prompt used at generation time is [BOS] alone."""
    ids = [tok.encode(c, bos=True, eos=True) for c in captions]
    lengths = np.array([len(x) for x in ids])
    T = int(lengths.max())
    input_ids = np.full((len(ids), T), tok.pad_id, dtype=np.int64)
    for b, x in enumerate(ids):
        input_ids[b, : len(x)] = x
    targets = np.full_like(input_ids, IGNORE_INDEX)
    targets[:, :-1] = input_ids[:, 1:]  # position t predicts token t+1 ...
    targets[np.arange(T)[None, :] >= lengths[:, None] - 1] = IGNORE_INDEX  # ... where there is one
    return torch.from_numpy(input_ids), torch.from_numpy(targets)


class CaptionDataset(Dataset):
    """prefixes (N, P, F) float32 and one caption per row, tokenized once."""

    def __init__(self, prefixes: np.ndarray, captions: list[str], tokenizer: ByteTokenizer):
        assert len(prefixes) == len(captions)
        self.prefixes = torch.as_tensor(np.ascontiguousarray(prefixes), dtype=torch.float32)
        self.captions = list(captions)
        self.input_ids, self.targets = tokenize_captions(tokenizer, self.captions)

    @property
    def text_len(self) -> int:
        """T of every batch: the longest [BOS] caption [EOS]."""
        return self.input_ids.shape[1]

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        return self.prefixes[i], self.captions[i]

    def __getitems__(self, indices: list[int]) -> dict:
        """A whole batch; the DataLoader calls this instead of one `__getitem__` per sample."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {"prefix": self.prefixes[idx], "input_ids": self.input_ids[idx], "targets": self.targets[idx],
                "captions": [self.captions[i] for i in indices]}


def keep_batch(batch: dict) -> dict:
    """The DataLoader's collate function: `__getitems__` already returns a batch."""
    return batch


class DeviceBatches:
    """A training split that lives on the device, reshuffled each epoch from a seeded generator, full batches only:
    a batch is three indexing kernels, with no loader work and no host-to-device copy per step."""

    def __init__(self, dataset: CaptionDataset, batch_size: int, device: torch.device, seed: int):
        self.tensors = {"prefix": dataset.prefixes.to(device), "input_ids": dataset.input_ids.to(device),
                        "targets": dataset.targets.to(device)}
        self.n, self.batch_size, self.device = len(dataset), min(batch_size, len(dataset)), device
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self):
        return self.n // self.batch_size

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.generator)
        if self.device.type == "cuda":  # pinned: the one copy per epoch does not wait for the queued steps
            order = order.pin_memory()
        order = order.to(self.device, non_blocking=True)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield {k: t[idx] for k, t in self.tensors.items()}


class CaptionDataModule(L.LightningDataModule):
    """Subclasses fill `self.train_set` / `self.val_set` in `setup` and set `prefix_len` / `prefix_dim`.

    on_device: "auto" keeps the training split on the GPU when training runs in one process and the split is at
    most ON_DEVICE_MAX_BYTES; otherwise batches come from a DataLoader (pinned memory on a GPU, `num_workers`)."""

    def __init__(self, batch_size: int = 64, num_workers: int = 0, seed: int = 0, on_device: bool | str = "auto"):
        super().__init__()
        if on_device not in ("auto", True, False):
            raise ValueError(f"data.on_device={on_device!r}: use auto, true or false")
        self.batch_size, self.num_workers, self.seed, self.on_device = batch_size, num_workers, seed, on_device
        self.tokenizer = ByteTokenizer()
        self.train_set: CaptionDataset | None = None
        self.val_set: CaptionDataset | None = None

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
                raise ValueError("data.on_device=true needs one process on a GPU (with several, each process "
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
