"""Lightning DataModules over the data sources: what train.py instantiates from conf/data/*.yaml."""
from __future__ import annotations

from dataclasses import replace

import lightning as L
import torch
from torch.utils.data import DataLoader

from mmgpt.data.digits import DigitsTask
from mmgpt.data.features import DataFileError, load_features_file, split_features
from mmgpt.data.samples import DeviceBatches, Samples, keep_batch
from mmgpt.errors import UserError
from mmgpt.model import TEXT, GPTConfig, Modality
from mmgpt.tokenizer import ByteTokenizer

ON_DEVICE_MAX_BYTES = 1 << 30  # data.on_device=auto keeps a training split up to this size on the GPU


class SamplesDataModule(L.LightningDataModule):
    """Subclasses build `train_set` / `val_set` (untokenized), say which modalities they `provide` (with what the
    data determines of each) and the fixed `context_lens` of continuous ones; `setup` tokenizes the splits for
    the model's config. The tokenizer is the byte-level one unless the training run sets another (a pretrained
    model's) before `setup`.

    on_device: "auto" keeps the training split on the GPU when training runs in one process and the split is at
    most ON_DEVICE_MAX_BYTES; otherwise batches come from a DataLoader (pinned memory on a GPU, `num_workers`)."""

    provides: dict[str, Modality] = {}
    context_lens: dict[str, int] = {}

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
        self.model_config: GPTConfig | None = None  # set by the training run before setup
        self.train_set: Samples | None = None
        self.val_set: Samples | None = None

    def build(self) -> tuple[Samples, Samples]:
        raise NotImplementedError

    def setup(self, stage=None):
        if self.model_config is None:  # outside a training run (a notebook): caption the data's other modalities
            others = [m for m in self.provides.values() if m.name != TEXT]
            self.model_config = GPTConfig(vocab_size=self.tokenizer.vocab_size, context=[m.name for m in others],
                                          modalities=[*others, Modality(TEXT, "discrete", head=True)], decoded=TEXT)
        if self.train_set is None:
            self.train_set, self.val_set = (ds.tokenize(self.tokenizer, self.model_config) for ds in self.build())

    def fill(self, modality: Modality) -> Modality:
        """A model config's modality completed with what the data determines (dim, vocab_size, end_id); a
        UserError where the data does not provide it, or provides it of another kind or size."""
        given = self.provides.get(modality.name)
        if given is None:
            raise UserError(f"model.modalities names {modality.name!r}, which the data does not provide (it provides "
                            f"{sorted(self.provides)}); rename the modality or use data that has it")
        if given.kind != modality.kind:
            raise UserError(f"model.modalities[{modality.name}].kind={modality.kind}, but the data provides it as "
                            f"{given.kind}")
        changes = {}
        for key in ("dim", "vocab_size", "end_id"):
            have, want = getattr(given, key), getattr(modality, key)
            if have is not None and want is not None and have != want:
                raise UserError(f"model.modalities[{modality.name}].{key}={want}, but the data's is {have}; leave "
                                f"it unset (the data sets it)")
            if have is not None:
                changes[key] = have
        return replace(modality, **changes)

    @property
    def max_positions(self) -> int:
        """The longest real context + framed decoded sequence in either split."""
        return max(ds.context_len + ds.decoded_len for ds in (self.train_set, self.val_set))

    def _device(self) -> torch.device:
        return self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")

    def _train_on_device(self, device: torch.device) -> bool:
        single = self.trainer is None or self.trainer.world_size == 1
        if self.on_device is True:
            if device.type != "cuda" or not single:
                raise UserError("data.on_device=true needs one process on a GPU (with several, each process "
                                "reads its own shard through a DataLoader): use data.on_device=auto")
            return True
        nbytes = sum(t.numel() * t.element_size() for t in self.train_set.tensors())
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

    def score(self, decoded: str, sequences: list[list[int]], texts: list[str], references: list) -> list[bool]:
        """Per validation sample: is the generation right? Text: exactly the reference caption."""
        if decoded != TEXT:
            raise UserError(f"this data has no metric for a generated {decoded!r}; decode text")
        return [t == r for t, r in zip(texts, references)]


class DigitsDataModule(SamplesDataModule):
    def __init__(self, digits_per_sample: int = 2, patch_size: int = 4, train_samples: int = 20000,
                 val_samples: int = 500, val_fraction: float = 0.2, batch_size: int = 64, num_workers: int = 0,
                 seed: int = 0, on_device: bool | str = "auto", image_tokens: bool = False, image_codes: int = 0):
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, on_device=on_device)
        self.task = DigitsTask(digits_per_sample, patch_size, train_samples, val_samples, val_fraction, seed,
                               image_tokens, image_codes)
        self.provides, self.context_lens = self.task.provides, self.task.context_lens
        self.val_image_ids = self.val_pick = None
        self._reader = None

    def build(self):
        train, val, self.val_pick, self.val_image_ids = self.task.build()
        return train, val

    def score(self, decoded, sequences, texts, references):
        """A drawn image is right when the classifier fitted on the training images reads the caption's digits."""
        if decoded != "image":
            return super().score(decoded, sequences, texts, references)
        if self._reader is None:
            self._reader = self.task.reader()
        return self._reader.recognised(self.task.drawn_images(sequences), references)


class FeaturesDataModule(SamplesDataModule):
    def __init__(self, path: str, val_fraction: float = 0.1, batch_size: int = 32, num_workers: int = 0,
                 seed: int = 0, on_device: bool | str = "auto"):
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, on_device=on_device)
        self.path = path
        features, texts = load_features_file(path)  # a bad file or split fails here, before training starts
        self.provides = {"features": Modality("features", "continuous", dim=features.shape[2]),
                         "text": Modality("text", "discrete")}
        self.context_lens = {"features": features.shape[1]}
        try:
            self._splits = split_features(features, texts, val_fraction, seed)
        except DataFileError as e:
            raise DataFileError(f"{path}: {e}") from None

    def build(self):
        return self._splits
