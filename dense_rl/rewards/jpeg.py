"""DDPO's JPEG rewards: the size of each image saved as a quality-95 JPEG, in kB."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

_JPEG_QUALITY = 95


def _to_uint8_hwc(images) -> np.ndarray:
    """[B, 3, H, W] floats in [0, 1] (tensor or array) -> [B, H, W, 3] uint8."""
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu().numpy()
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W] in [0, 1], got shape {images.shape}")
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)


def jpeg_sizes_kb(images) -> np.ndarray:
    """Size of each image as a quality-95 JPEG, in kB (1 kB = 1000 bytes); float32 [B]."""
    sizes = []
    for pixels in _to_uint8_hwc(images):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=_JPEG_QUALITY)
        sizes.append(buffer.tell() / 1000.0)
    return np.asarray(sizes, dtype=np.float32)


class JpegCompressibility:
    """Reward small files: -(JPEG size in kB)."""

    name = "jpeg_compressibility"

    def __call__(self, images, prompts=None) -> np.ndarray:
        return -jpeg_sizes_kb(images)


class JpegIncompressibility:
    """Reward large files: +(JPEG size in kB)."""

    name = "jpeg_incompressibility"

    def __call__(self, images, prompts=None) -> np.ndarray:
        return jpeg_sizes_kb(images)
