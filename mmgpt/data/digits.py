"""The default task: captions of a few scikit-learn digit images (bundled with the package, no download).

Each sample is `digits_per_sample` 8x8 images and a caption that is a deterministic function of the digits, e.g.
"seven three sum 10": it cannot be produced without reading every image. The image is a modality of its own:
continuous (patches through an encoder) or, with `image_tokens`, discrete: each pixel's value 0..16 a token of a
17-value vocabulary, or with `image_codes` = N each 2x2 patch the nearest of N codes (k-means over the training
split's patches, seeded: four times fewer tokens), plus an end token. The model config chooses the direction:
caption the image, or draw the digits a caption names (`digits_draw`), scored by a classifier fitted on the
training split's real images.
The split is by image: no validation image appears in any training sample. Also here: turning image files into
the same inputs, for inference on a user's own scans.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmgpt.data.samples import Samples
from mmgpt.errors import UserError
from mmgpt.model import Modality

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
IMAGE_SIZE = 8  # load_digits' images are 8x8, values 0..16 with ink high
PIXEL_VALUES = 17  # a pixel token is its value 0..16; the next id ends (and starts) a drawn sequence
PIXELS = IMAGE_SIZE * IMAGE_SIZE
CODE_PATCH = 2  # image_codes: each code stands for a 2x2 patch
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


def digits_of(caption: str) -> list[int]:
    """The digits a caption names, in order (caption_for's inverse, up to the sum)."""
    return [WORDS.index(w) for w in caption.split() if w in WORDS]


def make_samples(images, labels, image_ids, n_samples, digits_per_sample, rng):
    """Random combinations of the given images -> per sample the k images' values (n, k*per-image elements, ...)
    and captions."""
    pick = rng.choice(image_ids, size=(n_samples, digits_per_sample))
    values = images[pick].reshape(n_samples, -1, *images.shape[2:])
    captions = [caption_for(labels[row]) for row in pick]
    return values, captions, pick


class DigitReader:
    """A classifier fitted on the training split's real images: reads drawn images (pixel values 0..16)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, train_ids, val_ids):
        from sklearn.svm import SVC  # the one place besides load_digits that needs scikit-learn
        flat = images.reshape(len(images), -1) / 16.0
        self.classifier = SVC(gamma=0.02, C=10.0).fit(flat[train_ids], labels[train_ids])
        self.held_out_accuracy = float((self.classifier.predict(flat[val_ids]) == labels[val_ids]).mean())

    def read(self, images: np.ndarray) -> np.ndarray:
        """Images (n, k, 8, 8) of values 0..16 -> the digits read, (n, k)."""
        return self.classifier.predict(images.reshape(-1, PIXELS) / 16.0).reshape(images.shape[:2])

    def recognised(self, images: np.ndarray, captions: list[str]) -> list[bool]:
        """Per sample: does the classifier read every digit its caption names?"""
        return [list(r) == digits_of(c) for r, c in zip(self.read(images), captions)]


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
    image_tokens: bool = False  # the image as discrete tokens instead of continuous patches
    image_codes: int = 0  # image_tokens: 0 = one token per pixel value; N = one of N codes per 2x2 patch

    def __post_init__(self):
        if self.digits_per_sample < 1:
            raise UserError(f"data.digits_per_sample={self.digits_per_sample} must be >= 1")
        if self.train_samples < 1 or self.val_samples < 1:
            raise UserError(f"data.train_samples={self.train_samples} and data.val_samples={self.val_samples} "
                             "must be >= 1")
        if self.image_codes < 0 or (self.image_codes and not self.image_tokens):
            raise UserError(f"data.image_codes={self.image_codes} must be >= 0, and > 0 only with "
                            "data.image_tokens=true (codes are the discrete image's tokens)")
        if self.patch_size < 1 or IMAGE_SIZE % self.patch_size:
            raise UserError(f"data.patch_size={self.patch_size} must divide the {IMAGE_SIZE}x{IMAGE_SIZE} images "
                             "(1, 2, 4 or 8)")

    @property
    def provides(self) -> dict[str, Modality]:
        """The modalities of every sample, with what the data determines of each."""
        if self.image_tokens:
            values = self.image_codes or PIXEL_VALUES
            image = Modality("image", "discrete", vocab_size=values + 1, end_id=values)
        else:
            image = Modality("image", "continuous", dim=self.patch_size * self.patch_size)
        return {"image": image, "text": Modality("text", "discrete")}

    @property
    def context_lens(self) -> dict[str, int]:
        """The continuous image's length: its patches."""
        return {} if self.image_tokens else {"image": self.digits_per_sample * (IMAGE_SIZE // self.patch_size) ** 2}

    @property
    def tokens_per_image(self) -> int:
        return PIXELS // CODE_PATCH ** 2 if self.image_codes else PIXELS

    def images(self, images: np.ndarray) -> np.ndarray:
        """(N, 8, 8) values 0..16 -> what a sample holds per image: patches (N, patches, F), pixel ids (N, 64) or
        patch codes (N, 16)."""
        if self.image_codes:
            patches = patchify(images, CODE_PATCH) * 16.0  # (N, 16, 4) back in pixel values
            distances = ((patches[:, :, None, :] - self.codebook()[None, None]) ** 2).sum(-1)
            return distances.argmin(-1).astype(np.int64)
        if self.image_tokens:
            return np.rint(images).astype(np.int64).clip(0, PIXEL_VALUES - 1).reshape(len(images), PIXELS)
        return patchify(images, self.patch_size)

    def codebook(self) -> np.ndarray:
        """The image_codes centroids (N, 4) in pixel values: k-means over the training split's 2x2 patches."""
        if not hasattr(self, "_codebook"):
            from sklearn.cluster import KMeans
            from sklearn.datasets import load_digits
            digits = load_digits()
            train_ids, _ = split_images(len(digits.target), self.val_fraction, self.seed)
            patches = patchify(digits.images[train_ids], CODE_PATCH).reshape(-1, CODE_PATCH ** 2) * 16.0
            kmeans = KMeans(self.image_codes, n_init=4, random_state=self.seed).fit(patches)
            object.__setattr__(self, "_codebook", kmeans.cluster_centers_.astype(np.float32))
        return self._codebook

    def drawn_images(self, sequences: list[list[int]]) -> np.ndarray:
        """Generated token sequences -> images (n, k, 8, 8) of values 0..16: a short sequence is padded with blank
        pixels, an id past the vocabulary counts as its last value."""
        n, k = self.tokens_per_image, self.digits_per_sample
        ids = np.full((len(sequences), k * n), -1, dtype=np.int64)  # -1: not generated, drawn blank
        for i, seq in enumerate(sequences):
            row = np.asarray(seq[: k * n], dtype=np.int64)
            ids[i, : len(row)] = row
        if not self.image_codes:
            pixels = np.where(ids < 0, 0, np.minimum(ids, PIXEL_VALUES - 1))
            return pixels.reshape(-1, k, IMAGE_SIZE, IMAGE_SIZE).astype(np.float64)
        codebook = self.codebook()
        side = IMAGE_SIZE // CODE_PATCH
        patches = np.where(ids[..., None] < 0, 0.0, codebook[np.clip(ids, 0, len(codebook) - 1)])
        patches = patches.reshape(-1, k, side, side, CODE_PATCH, CODE_PATCH)
        return patches.transpose(0, 1, 2, 4, 3, 5).reshape(-1, k, IMAGE_SIZE, IMAGE_SIZE).astype(np.float64)

    def build(self):
        """-> train set, validation set, the validation samples' image ids (n, k), the held-out image ids."""
        from sklearn.datasets import load_digits  # the one place that needs scikit-learn
        digits = load_digits()
        images = self.images(digits.images)
        train_ids, val_ids = split_images(len(digits.target), self.val_fraction, self.seed)
        rng = np.random.default_rng(self.seed)
        v, c, _ = make_samples(images, digits.target, train_ids, self.train_samples, self.digits_per_sample, rng)
        train = Samples({"image": v, "text": c}, c)
        v, c, val_pick = make_samples(images, digits.target, val_ids, self.val_samples, self.digits_per_sample, rng)
        return train, Samples({"image": v, "text": c}, c), val_pick, val_ids

    def reader(self) -> DigitReader:
        """The classifier that scores drawn digits, fitted on this task's training images."""
        from sklearn.datasets import load_digits
        digits = load_digits()
        train_ids, val_ids = split_images(len(digits.target), self.val_fraction, self.seed)
        return DigitReader(digits.images, digits.target, train_ids, val_ids)

    @classmethod
    def from_data_config(cls, data: dict | None) -> "DigitsTask":
        """The task a training run's data config (as saved in its checkpoint and manifest) describes."""
        if not data or not str(data.get("_target_", "")).endswith("DigitsDataModule"):
            raise UserError("this model was not trained on the digits task; pass input=/path/to/features.npz "
                             "(or .jsonl) with features of the shape it was trained on")
        fields = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in fields})


def read_images(sources: list, task: DigitsTask, names: list[str] | None = None) -> np.ndarray:
    """Image files (paths, or binary file objects with `names` for messages) -> 8x8 digit-style images (ink high, as
    in load_digits) as the trained image modality holds them (patches or tokens), grouped into samples of the
    trained digits-per-sample."""
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
    values = task.images(np.stack(images))  # (N, patches, F) or (N, 64)
    return values.reshape(len(sources) // per, -1, *values.shape[2:])
