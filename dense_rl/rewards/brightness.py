"""Brightness and darkness: the mean over pixels of each pixel's brightest channel (HSV value), in
[0, 1], and one minus it. Rewards with no model, like DDPO's JPEG pair, that the embedded model can
move either way: its digits are drawn in saturated colours on black, so brightness is the share of
the image the stroke covers. Bolder, larger digits score higher on `brightness`, thinner ones on
`darkness`; a washed-out background or an erased digit would game them, which the sample grids and an
unseen reward (digit alignment) show.
"""

from __future__ import annotations

import torch


def brightness(images) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> float32 [B]: the mean over pixels of max(R, G, B)."""
    images = torch.as_tensor(images)
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
    return images.detach().float().clamp(0, 1).amax(dim=1).mean(dim=(1, 2)).cpu()


class Brightness:
    name = "brightness"

    def __call__(self, images, prompts=None) -> torch.Tensor:
        return brightness(images)


class Darkness:
    name = "darkness"

    def __call__(self, images, prompts=None) -> torch.Tensor:
        return 1.0 - brightness(images)
