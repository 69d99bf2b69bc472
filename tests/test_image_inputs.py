"""Image files become the image inputs training saw, checked by value: a scan's dark ink on a light background is
inverted to load_digits' convention (ink high, 0..16), a light-on-dark image is taken as it is."""
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from mmgpt.data.digits import DigitsTask, patchify, read_images


@pytest.mark.parametrize("ink", ["dark on light", "light on dark"])
def test_image_files_give_the_training_prefixes(tmp_path, ink):
    digits = load_digits().images[:4]  # (4, 8, 8), 0..16, ink high
    paths = []
    for i, image in enumerate(digits):
        pixels = image * 255 / 16
        pixels = 255 - pixels if ink == "dark on light" else pixels
        paths.append(str(tmp_path / f"img{i}.png"))
        Image.fromarray(np.round(pixels).astype(np.uint8)).save(paths[-1])
    got = read_images(paths, DigitsTask())
    want = patchify(digits, 4).reshape(2, 8, 16)  # two digits per sample, their 4x4 patches
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=16 / 255)  # 8-bit rounding only
    inverted_wrongly = 16.0 - want
    assert np.abs(got - inverted_wrongly).max() > 8  # negative control: the other convention is far off


def test_image_files_as_pixel_tokens(tmp_path):
    digits = load_digits().images[:2]
    paths = []
    for i, image in enumerate(digits):
        paths.append(str(tmp_path / f"img{i}.png"))
        Image.fromarray(np.round(image * 255 / 16).astype(np.uint8)).save(paths[-1])
    got = read_images(paths, DigitsTask(image_tokens=True))
    assert got.shape == (1, 128) and got.dtype == np.int64
    assert np.abs(got[0] - digits.reshape(-1)).max() <= 1  # 8-bit rounding, then the nearest pixel value
