"""CoCA / UCA step weights and step-reward shaping against hand-computed closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from dense_rl.credit import (
    CREDIT_MODES,
    coca_step_weights,
    shape_step_rewards,
    step_weights_for,
    uniform_step_weights,
)


def unit_vectors_with_cosines(cosines: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """x0_preds [1, T, 2] whose cosines to final = [1, 0] are the given values."""
    angles = [math.acos(c) for c in cosines]
    x0_preds = torch.tensor([[[math.cos(a), math.sin(a)] for a in angles]])
    return x0_preds, torch.tensor([[1.0, 0.0]])


def test_hand_computed_example_t4_w2():
    cosines = [0.2, 0.4, 0.5, 0.9]  # c_0..c_3; c_4 = 1
    x0_preds, final = unit_vectors_with_cosines(cosines)
    # Windows over c_1..c_4: (0.4, 0.5) -> 0.45, (0.9, 1.0) -> 0.95.
    # Gains g_0 = 0.45 - 0.2 = 0.25, g_1 = 0.95 - 0.45 = 0.5; sum = 0.75.
    # s = [0.25, 0.25, 0.5, 0.5] / (2 * 0.75).
    expected = torch.tensor([[0.25, 0.25, 0.5, 0.5]]) / 1.5
    weights = coca_step_weights(x0_preds, final, window_size=2)
    assert weights.dtype == torch.float32 and weights.shape == (1, 4)
    torch.testing.assert_close(weights, expected, rtol=0, atol=1e-6)


def test_window_size_one_and_whole_trajectory():
    cosines = [0.1, 0.3, 0.6, 0.7]
    x0_preds, final = unit_vectors_with_cosines(cosines)
    # w = 1: g_k = c_{k+1} - c_k, total = 1 - c_0 = 0.9.
    weights = coca_step_weights(x0_preds, final, window_size=1)
    torch.testing.assert_close(weights, torch.tensor([[0.2, 0.3, 0.1, 0.3]]) / 0.9, rtol=0, atol=1e-6)
    # w = T: one window, so every step gets 1/T whatever the cosines.
    weights = coca_step_weights(x0_preds, final, window_size=4)
    torch.testing.assert_close(weights, torch.full((1, 4), 0.25), rtol=0, atol=1e-6)


def test_rows_sum_to_one_and_are_per_row():
    torch.manual_seed(0)
    final = torch.randn(5, 3, 4, 4)
    # Predictions that drift towards the final sample, as in real sampling.
    mix = torch.linspace(0.0, 0.95, 10).view(1, 10, 1, 1, 1)
    x0_preds = (1 - mix) * torch.randn(5, 10, 3, 4, 4) + mix * final.unsqueeze(1)
    weights, fallback = coca_step_weights(x0_preds, final, window_size=5, return_fallback=True)
    assert weights.shape == (5, 10) and fallback.shape == (5,) and fallback.dtype == torch.bool
    assert not fallback.any()
    torch.testing.assert_close(weights.sum(1), torch.ones(5))
    # Each row depends only on its own trajectory.
    single = coca_step_weights(x0_preds[2:3], final[2:3], window_size=5)
    torch.testing.assert_close(weights[2:3], single)
    # Weights are constant within a window.
    assert torch.equal(weights[:, :5], weights[:, :1].expand(-1, 5))


def test_zero_total_gain_falls_back_to_uniform_and_reports_it():
    torch.manual_seed(1)
    final = torch.randn(3, 2, 4, 4)
    x0_preds = torch.randn(3, 6, 2, 4, 4)
    x0_preds[1] = final[1]  # every prediction equals the final sample: all gains are 0
    weights, fallback = coca_step_weights(x0_preds, final, window_size=3, return_fallback=True)
    assert fallback.tolist() == [False, True, False]
    torch.testing.assert_close(weights[1], torch.full((6,), 1 / 6))
    assert torch.isfinite(weights).all()
    mode_weights, num_fallback = step_weights_for("coca", x0_preds, final, window_size=3)
    assert num_fallback == 1
    torch.testing.assert_close(mode_weights, weights)


def test_invalid_shapes_raise():
    x0_preds, final = torch.randn(2, 6, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"\(6\).*\(4\)"):
        coca_step_weights(x0_preds, final, window_size=4)
    with pytest.raises(ValueError, match="window_size"):
        coca_step_weights(x0_preds, final, window_size=0)
    with pytest.raises(ValueError, match="match"):
        coca_step_weights(x0_preds, torch.randn(2, 4), window_size=2)
    with pytest.raises(ValueError, match="match"):
        coca_step_weights(x0_preds, torch.randn(3, 3), window_size=2)
    with pytest.raises(ValueError, match=r"\[B, T, \.\.\.\]"):
        coca_step_weights(torch.randn(2, 6), torch.randn(2), window_size=2)


def test_fp16_input_matches_float32():
    torch.manual_seed(2)
    # Scale 30: a squared norm over 256 entries (~230k) overflows fp16 (max 65504) if computed in it.
    final = 30 * torch.randn(2, 4, 8, 8)
    mix = torch.linspace(0.1, 0.9, 4).view(1, 4, 1, 1, 1)
    x0_preds = (1 - mix) * 30 * torch.randn(2, 4, 4, 8, 8) + mix * final.unsqueeze(1)
    weights32 = coca_step_weights(x0_preds, final, window_size=2)
    weights16 = coca_step_weights(x0_preds.half(), final.half(), window_size=2)
    assert weights16.dtype == torch.float32
    torch.testing.assert_close(weights16, weights32, rtol=0, atol=2e-3)


def test_uniform_and_sparse_modes():
    x0_preds, final = torch.randn(3, 8, 2, 2), torch.randn(3, 2, 2)
    weights = uniform_step_weights(3, 8)
    assert weights.shape == (3, 8) and weights.dtype == torch.float32
    torch.testing.assert_close(weights, torch.full((3, 8), 0.125))
    mode_weights, num_fallback = step_weights_for("uniform", x0_preds, final, window_size=4)
    torch.testing.assert_close(mode_weights, weights)
    assert num_fallback == 0
    assert step_weights_for("sparse", x0_preds, final, window_size=4) == (None, 0)
    with pytest.raises(ValueError, match="coca"):
        step_weights_for("dense", x0_preds, final, window_size=4)
    assert CREDIT_MODES == ("sparse", "uniform", "coca")


def test_shape_step_rewards_closed_form():
    advantages = torch.tensor([2.0, -1.0])
    step_weights = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, -0.1, 0.4, 0.2]])
    # G_t: reverse cumulative sums.
    remaining = torch.tensor([[1.0, 0.9, 0.7, 0.4], [1.0, 0.5, 0.6, 0.2]])
    alpha = 0.3
    expected = advantages.unsqueeze(1) * (alpha + (1 - alpha) * remaining)
    torch.testing.assert_close(shape_step_rewards(advantages, step_weights, alpha), expected)


def test_shape_step_rewards_limits():
    advantages = torch.tensor([1.5, -0.5, 0.0])
    step_weights = torch.softmax(torch.randn(3, 5), dim=1)
    # alpha = 1: every step gets the trajectory advantage.
    torch.testing.assert_close(shape_step_rewards(advantages, step_weights, 1.0), advantages.unsqueeze(1).expand(3, 5))
    # alpha = 0 with uniform weights: G_t = (T - t) / T.
    rewards = shape_step_rewards(advantages, uniform_step_weights(3, 5), 0.0)
    remaining = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0]) / 5
    torch.testing.assert_close(rewards, advantages.unsqueeze(1) * remaining)
    for alpha in (-0.1, 1.1):
        with pytest.raises(ValueError, match="alpha"):
            shape_step_rewards(advantages, step_weights, alpha)
    with pytest.raises(ValueError, match=r"\[B\]"):
        shape_step_rewards(advantages[:2], step_weights, 0.0)
