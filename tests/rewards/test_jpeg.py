"""DDPO's JPEG rewards."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from dense_rl.rewards.jpeg import JpegCompressibility, JpegIncompressibility


def flat_and_noise_images():
    torch.manual_seed(0)
    flat = torch.full((1, 3, 64, 64), 0.5)
    noise = torch.rand(1, 3, 64, 64)
    return torch.cat([flat, noise])


def test_flat_image_is_more_compressible_than_noise():
    images = flat_and_noise_images()
    compressibility = JpegCompressibility()(images, ["a flat image", "noise"])
    incompressibility = JpegIncompressibility()(images, ["a flat image", "noise"])
    assert compressibility.shape == (2,) and compressibility.dtype == np.float32
    assert incompressibility.shape == (2,) and incompressibility.dtype == np.float32
    assert compressibility[0] > compressibility[1]
    assert incompressibility[1] > incompressibility[0]
    np.testing.assert_array_equal(compressibility, -incompressibility)
    assert JpegCompressibility.name == "jpeg_compressibility"
    assert JpegIncompressibility.name == "jpeg_incompressibility"


def test_size_is_the_quality_95_jpeg_in_kilobytes():
    images = flat_and_noise_images()
    pixels = (images[1].numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    size_kb = JpegIncompressibility()(images, ["", ""])[1]
    assert size_kb == pytest.approx(len(buffer.getvalue()) / 1000)


def test_rejects_non_rgb_batches():
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        JpegCompressibility()(torch.rand(3, 64, 64), ["x"])
