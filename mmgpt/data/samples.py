"""What every mmgpt data source shares: samples of the data's modalities and their batching. No Lightning here, so
the inference path can read data without the training stack.

A sample holds one value per modality: features (P, F) of a continuous one, a text (tokenized once, when the
training run knows its tokenizer) or token ids of a discrete one. Discrete sequences are padded to the dataset's
longest; training drops the last partial batch. So every training batch has the same shape, which torch.compile
and CUDA graphs need, and a batch costs one indexing per tensor instead of per-sample Python work.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from mmgpt.errors import UserError
from mmgpt.model import TEXT, GPTConfig

IGNORE_INDEX = -100


def right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> ids (N, T) right-padded with pad_id, lengths (N,)."""
    ids = torch.full((len(rows), max((len(r) for r in rows), default=0)), pad_id, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return ids, torch.tensor([len(r) for r in rows], dtype=torch.long)


def frame_sequences(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Framed sequences (start ... end), right-padded -> input_ids (N, T) and next-token targets (N, T) that ignore
    padding. The prompt used at generation time is the start token alone."""
    input_ids, lengths = right_pad(rows, pad_id)
    targets = torch.full_like(input_ids, IGNORE_INDEX)
    targets[:, :-1] = input_ids[:, 1:]  # position t predicts token t+1 ...
    targets[torch.arange(input_ids.shape[1])[None, :] >= lengths[:, None] - 1] = IGNORE_INDEX  # ... where there is one
    return input_ids, targets


def tokenize_captions(tok, captions: list[str]):
    """[BOS] caption [EOS] per text -> input_ids (N, T), targets (N, T)."""
    return frame_sequences([tok.encode(c, bos=True, eos=True) for c in captions], tok.pad_id)


class Samples(Dataset):
    """N samples: per modality, float features (N, P, F), N texts, or N token-id sequences; and per sample the
    reference validation scores a generation against (a caption, or the digits an image must show).
    `tokenize` once, for the model's context and decoded modality, before batching."""

    def __init__(self, values: dict, references: list):
        sizes = {name: len(v) for name, v in values.items()}
        if len(set(sizes.values()) | {len(references)}) != 1:
            raise UserError(f"the data's modalities have different sample counts {sizes} ({len(references)} "
                            "references); they must pair up")
        self.values = {name: torch.as_tensor(np.ascontiguousarray(v), dtype=torch.float32)
                       if isinstance(v, np.ndarray) and v.dtype.kind == "f" else list(v) for name, v in values.items()}
        self.references = list(references)
        self.context: dict | None = None
        self.input_ids = self.targets = None

    def tokenize(self, tokenizer, config: GPTConfig) -> "Samples":
        """Tensors of the model's context (features; ids right-padded and lengths) and its decoded modality's
        framed sequences with next-token targets."""
        def rows(m, framed: bool):
            raw = self.values[m.name]
            if m.name == TEXT:
                return [tokenizer.encode(t, bos=framed, eos=framed) for t in raw]
            return [[m.end_id, *map(int, r), m.end_id] if framed else [int(i) for i in r] for r in raw]

        self.context = {}
        for m in config.context_modalities:
            if m.kind == "continuous":
                self.context[m.name] = self.values[m.name]
            else:
                self.context[m.name] = right_pad(rows(m, False), m.end_id if m.end_id is not None else 0)
        decoded = config.decoded_modality
        pad = tokenizer.pad_id if decoded.name == TEXT else decoded.end_id
        self.input_ids, self.targets = frame_sequences(rows(decoded, True), pad)
        return self

    @property
    def context_len(self) -> int:
        """The longest real context of any sample."""
        total = torch.zeros(len(self), dtype=torch.long)
        for value in self.context.values():
            total += value.shape[1] if torch.is_tensor(value) else value[1]
        return int(total.max())

    @property
    def decoded_len(self) -> int:
        """T of every batch: the longest framed sequence of the decoded modality."""
        return self.input_ids.shape[1]

    def __len__(self):
        return len(self.references)

    def __getitem__(self, i):
        return {name: v[i] for name, v in self.values.items()}, self.references[i]

    def batch(self, idx: torch.Tensor) -> dict:
        """The tensors of the samples at idx: context, input_ids, targets."""
        context = {name: v[idx] if torch.is_tensor(v) else (v[0][idx], v[1][idx]) for name, v in self.context.items()}
        return {"context": context, "input_ids": self.input_ids[idx], "targets": self.targets[idx]}

    def __getitems__(self, indices: list[int]) -> dict:
        """A whole batch; the DataLoader calls this instead of one `__getitem__` per sample."""
        return {**self.batch(torch.as_tensor(indices, dtype=torch.long)),
                "references": [self.references[i] for i in indices]}

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor a batch indexes."""
        return [t for v in self.context.values() for t in ([v] if torch.is_tensor(v) else v)] + \
            [self.input_ids, self.targets]

    def to(self, device: torch.device) -> "Samples":
        """A copy whose batch tensors live on `device`."""
        moved = Samples.__new__(Samples)
        moved.values, moved.references = self.values, self.references
        moved.context = {name: v.to(device) if torch.is_tensor(v) else tuple(t.to(device) for t in v)
                         for name, v in self.context.items()}
        moved.input_ids, moved.targets = self.input_ids.to(device), self.targets.to(device)
        return moved


def keep_batch(batch: dict) -> dict:
    """The DataLoader's collate function: `__getitems__` already returns a batch."""
    return batch


class DeviceBatches:
    """A training split that lives on the device, reshuffled each epoch from a seeded generator, full batches only:
    a batch is a few indexing kernels, with no loader work and no host-to-device copy per step."""

    def __init__(self, dataset: Samples, batch_size: int, device: torch.device, seed: int):
        self.samples = dataset.to(device)
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
            yield self.samples.batch(order[i * self.batch_size:(i + 1) * self.batch_size])
