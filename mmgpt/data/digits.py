"""The default task: captions of a few scikit-learn digit images (bundled with the package, no download).

Each sample is `digits_per_sample` 8x8 images cut into patches (the prefix) and a caption that is a deterministic
function of the digits, e.g. "seven three sum 10": it cannot be produced without reading every image.
The split is by image: no validation image appears in any training sample. Also here: turning image files into
the same prefixes, for inference on a user's own scans.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmgpt.data.captions import CaptionDataset
from mmgpt.errors import UserError

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
IMAGE_SIZE = 8  # load_digits' images are 8x8, values 0..16 with ink high
MAX_IMAGE_PIXELS = 4096 * 4096  # 48 MiB decoded as RGB: a photo of a page fits, a decompression bomb does not


def caption_for(digits) -> str:
    return " ".join(WORDS[d] for d in digits) + f" sum {sum(int(d) for d in digits)}"


def patchify(images: np.ndarray, patch: int) -> np.ndarray:
    """(N, H, W) -> (N, (H/patch)*(W/patch), patch*patch), row-major patches, values scaled to [0, 1]."""
    N, H, W = images.shape
    if patch < 1 or H % patch or W % patch:
        raise UserError(f"patch size {patch} must divide the image size {H}x{W}")
    x = images.reshape(N, H // patch, patch, W // patch, patch).transpose(0, 1, 3, 2, 4)
    return (x.reshape(N, (H // patch) * (W // patch), patch * patch) / 16.0).astype(np.float32)


def split_images(n_images: int, val_fraction: float, seed: int):
    """Disjoint train / validation image indices."""
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction={val_fraction} must lie strictly between 0 and 1")
    perm = np.random.default_rng(seed).permutation(n_images)
    n_val = int(round(n_images * val_fraction))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def make_samples(patches, labels, image_ids, n_samples, digits_per_sample, rng):
    """Random combinations of the given images -> prefixes (n, k*patches, F) and captions."""
    pick = rng.choice(image_ids, size=(n_samples, digits_per_sample))
    prefixes = patches[pick].reshape(n_samples, -1, patches.shape[-1])
    captions = [caption_for(labels[row]) for row in pick]
    return prefixes, captions, pick


@dataclass(frozen=True)
class DigitsTask:
    """The task's parameters; `build()` gives the same seeded samples wherever it runs (training, or infer.py
    rebuilding the validation split the training run reported on)."""
    digits_per_sample: int = 2
    patch_size: int = 4
    train_samples: int = 20000
    val_samples: int = 500
    val_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self):
        if self.digits_per_sample < 1:
            raise UserError(f"data.digits_per_sample={self.digits_per_sample} must be >= 1")
        if self.train_samples < 1 or self.val_samples < 1:
            raise UserError(f"data.train_samples={self.train_samples} and data.val_samples={self.val_samples} "
                             "must be >= 1")
        if self.patch_size < 1 or IMAGE_SIZE % self.patch_size:
            raise UserError(f"data.patch_size={self.patch_size} must divide the {IMAGE_SIZE}x{IMAGE_SIZE} images "
                             "(1, 2, 4 or 8)")

    @property
    def prefix_dim(self) -> int:
        return self.patch_size * self.patch_size

    @property
    def prefix_len(self) -> int:
        return self.digits_per_sample * (IMAGE_SIZE // self.patch_size) ** 2

    def build(self):
        """-> train set, validation set, the validation samples' image ids (n, k), the held-out image ids."""
        from sklearn.datasets import load_digits  # the one place that needs scikit-learn
        digits = load_digits()
        patches = patchify(digits.images, self.patch_size)
        train_ids, val_ids = split_images(len(digits.target), self.val_fraction, self.seed)
        rng = np.random.default_rng(self.seed)
        p, c, _ = make_samples(patches, digits.target, train_ids, self.train_samples, self.digits_per_sample, rng)
        train = CaptionDataset(p, c)
        p, c, val_pick = make_samples(patches, digits.target, val_ids, self.val_samples, self.digits_per_sample, rng)
        return train, CaptionDataset(p, c), val_pick, val_ids

    @classmethod
    def from_data_config(cls, data: dict | None) -> "DigitsTask":
        """The task a training run's data config (as saved in its checkpoint and manifest) describes."""
        if not data or not str(data.get("_target_", "")).endswith("DigitsDataModule"):
            raise UserError("this model was not trained on the digits task; pass input=/path/to/features.npz "
                             "(or .jsonl) with features of the shape it was trained on")
        fields = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in fields})


def images_to_prefixes(sources: list, task: DigitsTask, names: list[str] | None = None) -> np.ndarray:
    """Image files (paths, or binary file objects with `names` for messages) -> 8x8 digit-style images (ink high,
    as in load_digits), patched as in training, grouped into samples of the trained digits-per-sample:
    (N / k, k * patches, F)."""
    from PIL import Image

    per = task.digits_per_sample
    names = names or [str(s) for s in sources]
    if len(sources) % per:
        raise UserError(f"{len(sources)} images, but the model reads {per} per sample: give a multiple of {per}")
    images = []
    for source, p in zip(sources, names):
        try:
            with Image.open(source) as im:  # reads the header only: the size is known before any pixel is decoded
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise UserError(f"{p}: {im.width}x{im.height} pixels, more than the {MAX_IMAGE_PIXELS} an input "
                                    "image may have (a digit scan needs far fewer); downscale it first")
                img = np.asarray(im.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR), dtype=np.float32)
        except (OSError, Image.DecompressionBombError) as e:
            raise UserError(f"{p}: not a readable image ({e})") from None
        if img.mean() > 127:  # dark digit on a light background: invert so ink is high
            img = 255.0 - img
        images.append(img / 255.0 * 16.0)
    patches = patchify(np.stack(images), task.patch_size)  # (N, patches, F)
    return patches.reshape(len(sources) // per, -1, patches.shape[-1])
