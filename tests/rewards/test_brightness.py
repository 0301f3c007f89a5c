"""The model-free brightness and darkness rewards."""

from __future__ import annotations

import pytest
import torch

from dense_rl.rewards import build_reward


def test_brightness_is_the_mean_of_each_pixels_brightest_channel_and_darkness_its_complement():
    images = torch.zeros(3, 3, 4, 4)
    images[1, 2] = 1.0  # all blue: max channel 1 everywhere
    images[2, 0, :2] = 0.5  # top half red at 0.5, bottom half black
    images[2, 1, 0, 0] = 0.9  # one green pixel brighter than its red
    bright, dark = build_reward("brightness"), build_reward("darkness")
    expected = torch.tensor([0.0, 1.0, (0.5 * 7 + 0.9) / 16])
    assert bright(images, ["", "", ""]) == pytest.approx(expected.tolist())
    assert dark(images, ["", "", ""]) == pytest.approx((1 - expected).tolist())
    assert bright(images, ["", "", ""]).dtype == torch.float32


def test_brightness_ranks_a_bold_stroke_above_a_thin_one_and_rejects_non_rgb():
    thin, bold = torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16)
    thin[:, 0, :, 7:9] = 1.0
    bold[:, 0, :, 5:11] = 1.0
    scores = build_reward("brightness")(torch.cat([thin, bold]), ["a red digit one"] * 2)
    assert scores[1] > scores[0]
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        build_reward("darkness")(torch.rand(3, 16, 16), ["x"])
