"""The credit modes' step weights and step-reward shaping against hand-computed closed forms, and the
registry that names the modes."""

from __future__ import annotations

import math

import pytest
import torch

from dense_rl.algo.credit import (
    CreditInputs,
    CreditMode,
    coca_step_weights,
    coca_step_weights_from_cosines,
    cosine_to_final,
    credit_mode,
    credit_mode_names,
    register,
    reward_gain_step_weights,
    shape_step_rewards,
    uniform_step_weights,
    window_boundary_steps,
)


def step_weights_for(mode, cosines, window_size, *, boundary_rewards=None, final_rewards=None, num_steps=None):
    """A mode's (weights or None, number of fallback rows) through the registry, as scoring asks for them."""
    mode = credit_mode(mode)
    if not mode.shapes_step_rewards:
        return None, 0
    if final_rewards is None:
        final_rewards = torch.zeros(cosines.shape[0] if cosines is not None else boundary_rewards.shape[0])
    if num_steps is None:
        num_steps = cosines.shape[1] if cosines is not None else boundary_rewards.shape[1] * window_size
    inputs = CreditInputs(final_rewards, num_steps, window_size, cosines=cosines, boundary_rewards=boundary_rewards)
    weights, fallback = mode.step_weights(inputs)
    return weights, int(fallback.sum())


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
    mode_weights, num_fallback = step_weights_for("coca", cosine_to_final(x0_preds, final), window_size=3)
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
    cosines = cosine_to_final(x0_preds, final)
    weights = uniform_step_weights(3, 8)
    assert weights.shape == (3, 8) and weights.dtype == torch.float32
    torch.testing.assert_close(weights, torch.full((3, 8), 0.125))
    mode_weights, num_fallback = step_weights_for("uniform", cosines, window_size=4)
    torch.testing.assert_close(mode_weights, weights)
    assert num_fallback == 0
    with pytest.raises(ValueError, match="unknown credit mode 'dense'; expected one of coca, ode_gain, reward_gain"):
        credit_mode("dense")
    assert {"sparse", "uniform", "coca", "reward_gain"} <= set(credit_mode_names())


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


def test_cosine_curve_is_a_first_class_input():
    cosines = [0.2, 0.4, 0.5, 0.9]
    x0_preds, final = unit_vectors_with_cosines(cosines)
    curve = cosine_to_final(x0_preds.half(), final.half())
    assert curve.dtype == torch.float32 and curve.shape == (1, 4)
    torch.testing.assert_close(curve, torch.tensor([cosines]), rtol=0, atol=1e-3)
    # Same hand-computed weights as test_hand_computed_example_t4_w2, straight from the curve.
    weights = coca_step_weights_from_cosines(torch.tensor([cosines]), window_size=2)
    torch.testing.assert_close(weights, torch.tensor([[0.25, 0.25, 0.5, 0.5]]) / 1.5, rtol=0, atol=1e-6)
    assert coca_step_weights_from_cosines(torch.tensor([cosines]).half(), window_size=2).dtype == torch.float32


def test_coca_step_weights_is_cosines_then_weights_exactly():
    torch.manual_seed(3)
    final = torch.randn(4, 3, 4, 4)
    x0_preds = torch.randn(4, 10, 3, 4, 4)
    x0_preds[3] = final[3]  # one fallback row, so the masks are compared too
    weights, fallback = coca_step_weights(x0_preds, final, window_size=5, return_fallback=True)
    weights2, fallback2 = coca_step_weights_from_cosines(
        cosine_to_final(x0_preds, final), window_size=5, return_fallback=True
    )
    assert torch.equal(weights, weights2) and torch.equal(fallback, fallback2)
    assert fallback.tolist() == [False, False, False, True]


def test_coca_from_cosines_validates_inputs():
    with pytest.raises(ValueError, match=r"cosines must be \[B, T\]"):
        coca_step_weights_from_cosines(torch.rand(2, 6, 1), window_size=2)
    with pytest.raises(ValueError, match=r"\(6\).*\(4\)"):
        coca_step_weights_from_cosines(torch.rand(2, 6), window_size=4)
    with pytest.raises(ValueError, match="window_size"):
        coca_step_weights_from_cosines(torch.rand(2, 6), window_size=0)


def test_reward_gain_hand_computed_example_t6_w2():
    boundary = torch.tensor([[0.0, 0.5, 0.5], [1.0, 2.0, 4.0]])  # R at steps 0, 2, 4
    final = torch.tensor([1.0, 5.0])
    # Row 0: gains 0.5, 0, 0.5 (sum 1) -> s = g / (2 * 1).
    # Row 1: gains 1, 2, 1 (sum 4) -> s = g / (2 * 4).
    expected = torch.tensor([[0.25, 0.25, 0.0, 0.0, 0.25, 0.25], [1, 1, 2, 2, 1, 1]]) / torch.tensor([[1.0], [8.0]])
    weights = reward_gain_step_weights(boundary, final, window_size=2)
    assert weights.dtype == torch.float32 and weights.shape == (2, 6)
    torch.testing.assert_close(weights, expected, rtol=0, atol=1e-6)
    assert window_boundary_steps(6, 2) == [0, 2, 4]


def test_reward_gain_rows_sum_to_one_and_are_per_row():
    torch.manual_seed(4)
    boundary = torch.randn(5, 4, dtype=torch.float64)
    final = boundary[:, 0] + 1 + torch.rand(5, dtype=torch.float64)  # total gain >= 1 in every row
    weights, fallback = reward_gain_step_weights(boundary, final, window_size=3, return_fallback=True)
    assert weights.shape == (5, 12) and weights.dtype == torch.float32 and not fallback.any()
    torch.testing.assert_close(weights.sum(1), torch.ones(5))
    torch.testing.assert_close(weights[2:3], reward_gain_step_weights(boundary[2:3], final[2:3], window_size=3))
    assert torch.equal(weights[:, 3:6], weights[:, 3:4].expand(-1, 3))


def test_reward_gain_window_size_one_and_whole_trajectory():
    boundary, final = torch.tensor([[0.1, 0.3, 0.6, 0.7]]), torch.tensor([1.0])
    # w = 1: every step is a boundary, g_k = R_{k+1} - R_k, total = 1 - R_0 = 0.9.
    weights = reward_gain_step_weights(boundary, final, window_size=1)
    torch.testing.assert_close(weights, torch.tensor([[0.2, 0.3, 0.1, 0.3]]) / 0.9, rtol=0, atol=1e-6)
    assert window_boundary_steps(4, 1) == [0, 1, 2, 3]
    # w = T: one window (only step 0 is scored), so every step gets 1/T.
    weights = reward_gain_step_weights(boundary[:, :1], final, window_size=4)
    torch.testing.assert_close(weights, torch.full((1, 4), 0.25), rtol=0, atol=1e-6)
    assert window_boundary_steps(4, 4) == [0]
    with pytest.raises(ValueError, match=r"\(6\).*\(4\)"):
        window_boundary_steps(6, 4)
    with pytest.raises(ValueError, match="window_size"):
        window_boundary_steps(6, 0)


def test_reward_gain_negative_gains_within_a_row():
    # Gains 1, -0.5, 1 (sum 1.5): the middle window lost reward and is charged for it.
    weights = reward_gain_step_weights(torch.tensor([[0.0, 1.0, 0.5]]), torch.tensor([1.5]), window_size=1)
    torch.testing.assert_close(weights, torch.tensor([[1.0, -0.5, 1.0]]) / 1.5, rtol=0, atol=1e-6)
    torch.testing.assert_close(weights.sum(1), torch.ones(1))


def test_reward_gain_guards_fall_back_to_uniform_and_report_it():
    nan, inf = float("nan"), float("inf")
    boundary = torch.tensor([[0.0, 0.5], [0.2, 0.7], [0.0, nan], [0.0, 0.5], [0.0, 0.5]])
    final = torch.tensor([1.0, 0.2, 1.0, inf, 1e-3])  # row 1: total gain 0; row 4: 1e-3
    weights, fallback = reward_gain_step_weights(boundary, final, window_size=2, return_fallback=True)
    assert fallback.tolist() == [False, True, True, True, False]
    torch.testing.assert_close(weights[1:4], torch.full((3, 4), 0.25))
    assert torch.isfinite(weights).all()
    _, fallback = reward_gain_step_weights(boundary, final, window_size=2, min_total_gain=1e-2, return_fallback=True)
    assert fallback.tolist() == [False, True, True, True, True]
    mode_weights, num_fallback = step_weights_for(
        "reward_gain", None, window_size=2, boundary_rewards=boundary, final_rewards=final
    )
    assert num_fallback == 3
    torch.testing.assert_close(mode_weights, weights)


def test_reward_gain_invalid_shapes_raise():
    boundary, final = torch.rand(2, 3), torch.rand(2)
    with pytest.raises(ValueError, match=r"boundary_rewards must be \[B, J\]"):
        reward_gain_step_weights(torch.rand(6), final, window_size=2)
    with pytest.raises(ValueError, match=r"boundary_rewards must be \[B, J\]"):
        reward_gain_step_weights(torch.rand(2, 0), final, window_size=2)
    with pytest.raises(ValueError, match=r"final_rewards must be \[B\] = \[2\]"):
        reward_gain_step_weights(boundary, torch.rand(3), window_size=2)
    with pytest.raises(ValueError, match=r"final_rewards must be \[B\]"):
        reward_gain_step_weights(boundary, torch.rand(2, 1), window_size=2)
    with pytest.raises(ValueError, match="window_size"):
        reward_gain_step_weights(boundary, final, window_size=0)


def test_step_weights_for_all_modes():
    torch.manual_seed(5)
    cosines = torch.rand(3, 6)
    boundary, final = torch.rand(3, 3), torch.rand(3) + 2
    weights, num_fallback = step_weights_for("coca", cosines, window_size=2)
    assert torch.equal(weights, coca_step_weights_from_cosines(cosines, window_size=2)) and num_fallback == 0
    weights, num_fallback = step_weights_for("uniform", cosines, window_size=2)
    assert torch.equal(weights, uniform_step_weights(3, 6)) and num_fallback == 0
    # Uniform takes T from num_steps and B from the rewards; it needs no cosine curve.
    weights, _ = step_weights_for("uniform", None, window_size=2, final_rewards=final, num_steps=6)
    assert torch.equal(weights, uniform_step_weights(3, 6))
    weights, num_fallback = step_weights_for(
        "reward_gain", cosines, window_size=2, boundary_rewards=boundary, final_rewards=final, num_steps=6
    )
    assert torch.equal(weights, reward_gain_step_weights(boundary, final, window_size=2)) and num_fallback == 0
    with pytest.raises(ValueError, match="cosines"):
        step_weights_for("coca", None, window_size=2, final_rewards=final, num_steps=6)
    with pytest.raises(ValueError, match="boundary_rewards"):
        step_weights_for("reward_gain", cosines, window_size=2, final_rewards=final)
    with pytest.raises(ValueError, match="num_steps is 8"):
        step_weights_for(
            "reward_gain", None, window_size=2, boundary_rewards=boundary, final_rewards=final, num_steps=8
        )



def test_scoring_gives_sparse_credit_no_step_weights():
    """Scoring, the step weights' consumer, asks the mode: sparse hands the advantages no weights
    (every step gets the trajectory's advantage) and counts no fallback however informative the batch's
    cosines are, while coca on the same batch gets the registry's weights."""
    from dense_rl.config import CreditConfig, RewardSpec
    from dense_rl.diffusion.trajectories import RewardInputs
    from dense_rl.rewards import WeightedRewards
    from dense_rl.training.scoring import score_trajectories

    generator = torch.Generator().manual_seed(6)
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8, generator=generator)
    batch = RewardInputs(["a", "b", "c"], images, torch.rand(3, 4, generator=generator).sort(1).values)
    rewards = WeightedRewards([RewardSpec("brightness")])
    sparse = score_trajectories(rewards, batch, CreditConfig(mode="sparse", window_size=2))
    assert sparse.step_weights is None and sparse.num_fallbacks == 0
    coca = score_trajectories(rewards, batch, CreditConfig(mode="coca", window_size=2))
    torch.testing.assert_close(coca.step_weights, coca_step_weights_from_cosines(batch.cosines, window_size=2))
    torch.testing.assert_close(sparse.rewards, coca.rewards)


def test_the_modes_say_what_they_need():
    """What the rest of the pipeline asks of a mode instead of comparing its name."""
    needs = {name: (credit_mode(name).shapes_step_rewards, credit_mode(name).windowed, credit_mode(name).boundaries)
             for name in ("sparse", "uniform", "coca", "reward_gain", "ode_gain")}
    assert needs == {"sparse": (False, False, None), "uniform": (True, False, None), "coca": (True, True, None),
                     "reward_gain": (True, True, "x0"), "ode_gain": (True, True, "ode")}
    assert credit_mode("reward_gain").boundary_model_calls(20, 5) == 0  # it decodes predictions, no extra calls
    assert credit_mode("ode_gain").boundary_model_calls(20, 5) == 20 + 15 + 10 + 5  # ODE from steps 0, 5, 10, 15


def test_ode_gain_weights_are_the_gains_of_the_completed_boundaries_rewards():
    """ode_gain on known rewards: boundaries completed to images scoring R_0 = 1, R_1 = 3, R_2 = 2 (steps 0,
    2, 4 of 6), final R_3 = 5: gains 2, -1, 3 of total 4, one weight per window of 2 steps."""
    boundary, final = torch.tensor([[1.0, 3.0, 2.0]]), torch.tensor([5.0])
    weights, fallback = credit_mode("ode_gain").step_weights(
        CreditInputs(final, num_steps=6, window_size=2, boundary_rewards=boundary))
    expected = torch.tensor([[2.0, 2.0, -1.0, -1.0, 3.0, 3.0]]) / (2 * 4.0)
    torch.testing.assert_close(weights, expected)
    assert not fallback.any() and weights.sum().item() == pytest.approx(1.0)


def test_a_mode_is_registered_once_and_checked():
    with pytest.raises(ValueError, match="registered twice"):
        register(CreditMode("coca", step_weights=None))
    with pytest.raises(ValueError, match="boundaries must be None, 'x0' or 'ode'"):
        CreditMode("new", step_weights=None, boundaries="decoded")
