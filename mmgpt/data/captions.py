"""What every mmgpt data source shares: (prefix, caption) samples and their batching. No Lightning here, so the
inference path can read data without the training stack.

Captions are tokenized once, when the training run knows its tokenizer, and padded to the dataset's longest
caption; training drops the last partial batch. So every training batch has the same shape, which torch.compile
and CUDA graphs need, and a batch costs one indexing per tensor instead of per-sample Python work.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset
from mmgpt.errors import UserError

IGNORE_INDEX = -100


def tokenize_captions(tok, captions: list[str]):
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
    """prefixes (N, P, F) float32 and one caption per row; `tokenize` once before batching."""

    def __init__(self, prefixes: np.ndarray, captions: list[str]):
        if len(prefixes) != len(captions):
            raise UserError(f"{len(prefixes)} prefixes but {len(captions)} captions; they must pair up")
        self.prefixes = torch.as_tensor(np.ascontiguousarray(prefixes), dtype=torch.float32)
        self.captions = list(captions)
        self.input_ids = self.targets = None

    def tokenize(self, tokenizer) -> "CaptionDataset":
        self.input_ids, self.targets = tokenize_captions(tokenizer, self.captions)
        return self

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
