"""The default task: captions of a few scikit-learn digit images (bundled with the package, no download).

Each sample is `digits_per_sample` 8x8 images cut into patches (the prefix) and a caption that is a deterministic
function of the digits, e.g. "seven three sum 10": it cannot be produced without reading every image.
The split is by image: no validation image appears in any training sample.
"""
from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits

from mmgpt.data.common import CaptionDataModule, CaptionDataset

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def caption_for(digits) -> str:
    return " ".join(WORDS[d] for d in digits) + f" sum {sum(int(d) for d in digits)}"


def patchify(images: np.ndarray, patch: int) -> np.ndarray:
    """(N, H, W) -> (N, (H/patch)*(W/patch), patch*patch), row-major patches, values scaled to [0, 1]."""
    N, H, W = images.shape
    if H % patch or W % patch:
        raise ValueError(f"patch size {patch} must divide the image size {H}x{W}")
    x = images.reshape(N, H // patch, patch, W // patch, patch).transpose(0, 1, 3, 2, 4)
    return (x.reshape(N, (H // patch) * (W // patch), patch * patch) / 16.0).astype(np.float32)


def split_images(n_images: int, val_fraction: float, seed: int):
    """Disjoint train / validation image indices."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must lie strictly between 0 and 1")
    perm = np.random.default_rng(seed).permutation(n_images)
    n_val = int(round(n_images * val_fraction))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def make_samples(patches, labels, image_ids, n_samples, digits_per_sample, rng):
    """Random combinations of the given images -> prefixes (n, k*patches, F) and captions."""
    pick = rng.choice(image_ids, size=(n_samples, digits_per_sample))
    prefixes = patches[pick].reshape(n_samples, -1, patches.shape[-1])
    captions = [caption_for(labels[row]) for row in pick]
    return prefixes, captions, pick


class DigitsDataModule(CaptionDataModule):
    def __init__(self, digits_per_sample: int = 2, patch_size: int = 4, train_samples: int = 20000,
                 val_samples: int = 500, val_fraction: float = 0.2, batch_size: int = 64, num_workers: int = 0,
                 seed: int = 0, on_device: bool | str = "auto"):
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, on_device=on_device)
        if digits_per_sample < 1:
            raise ValueError(f"digits_per_sample={digits_per_sample} must be >= 1")
        self.digits_per_sample, self.patch_size = digits_per_sample, patch_size
        self.train_samples, self.val_samples, self.val_fraction = train_samples, val_samples, val_fraction
        self.prefix_dim = patch_size * patch_size
        self.prefix_len = digits_per_sample * (8 // patch_size) ** 2
        self.val_image_ids = None

    def setup(self, stage=None):
        if self.train_set is not None:
            return
        digits = load_digits()
        patches = patchify(digits.images, self.patch_size)
        train_ids, self.val_image_ids = split_images(len(digits.target), self.val_fraction, self.seed)
        rng = np.random.default_rng(self.seed)
        p, c, _ = make_samples(patches, digits.target, train_ids, self.train_samples, self.digits_per_sample, rng)
        self.train_set = CaptionDataset(p, c, self.tokenizer)
        p, c, self.val_pick = make_samples(patches, digits.target, self.val_image_ids, self.val_samples,
                                           self.digits_per_sample, rng)
        self.val_set = CaptionDataset(p, c, self.tokenizer)
