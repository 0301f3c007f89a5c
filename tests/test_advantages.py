"""compute_step_advantages for the three credit modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dense_rl.advantages import compute_step_advantages
from dense_rl.credit import shape_step_rewards, uniform_step_weights
from dense_rl.stats import PerPromptStatTracker

PROMPTS = ["a", "b", "a", "b", "a", "b"]
REWARDS = np.array([1.0, 5.0, 2.0, 7.0, 6.0, 3.0])
NUM_STEPS = 4


def run(credit_mode, step_weights=None, *, temporal_alpha=0.0, adv_clip_max=5.0, min_count=1):
    return compute_step_advantages(
        PROMPTS,
        REWARDS,
        step_weights,
        credit_mode=credit_mode,
        num_steps=NUM_STEPS,
        reward_tracker=PerPromptStatTracker(buffer_size=32, min_count=min_count),
        step_tracker=PerPromptStatTracker(buffer_size=32, min_count=min_count),
        temporal_alpha=temporal_alpha,
        adv_clip_max=adv_clip_max,
        window_size=2,
    )


def first_stage(prompts=PROMPTS, rewards=REWARDS):
    return PerPromptStatTracker(buffer_size=32, min_count=1).update(prompts, rewards)


def coca_like_weights():
    return torch.tensor([[0.4, 0.4, 0.1, 0.1], [0.1, 0.2, 0.3, 0.4]]).repeat(3, 1)


def test_sparse_gives_the_trajectory_advantage_on_every_step():
    advantages, info = run("sparse")
    assert advantages.shape == (6, NUM_STEPS) and advantages.dtype == torch.float32
    assert torch.equal(advantages, advantages[:, :1].expand(-1, NUM_STEPS))
    torch.testing.assert_close(advantages[:, 0], torch.from_numpy(first_stage()))
    assert info["adv_clip_frac"] == 0.0
    assert info["reward_mean"] == pytest.approx(REWARDS.mean())


@pytest.mark.parametrize("credit_mode", ["uniform", "coca"])
def test_dense_modes_apply_the_second_normalisation_per_prompt(credit_mode):
    step_weights = coca_like_weights() if credit_mode == "coca" else None
    advantages, info = run(credit_mode, step_weights)
    assert advantages.shape == (6, NUM_STEPS) and advantages.dtype == torch.float32
    weights = step_weights if credit_mode == "coca" else uniform_step_weights(6, NUM_STEPS)
    step_rewards = shape_step_rewards(torch.from_numpy(first_stage()), weights, 0.0).numpy()
    for prompt in ("a", "b"):
        rows = [i for i, p in enumerate(PROMPTS) if p == prompt]
        expected = (step_rewards[rows] - step_rewards[rows].mean()) / (step_rewards[rows].std() + 1e-6)
        np.testing.assert_allclose(advantages[rows].numpy(), expected, rtol=1e-5, atol=1e-6)
        # After the second stage each prompt's step advantages have mean 0 and std 1.
        assert advantages[rows].mean().item() == pytest.approx(0.0, abs=1e-5)
        assert advantages[rows].std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    assert not torch.equal(advantages, advantages[:, :1].expand(-1, NUM_STEPS))
    if credit_mode == "coca":
        assert info["credit_first_window"] == pytest.approx(0.55)
        assert info["credit_last_window"] == pytest.approx(0.45)


def test_uniform_ignores_given_weights():
    given = coca_like_weights()
    torch.testing.assert_close(run("uniform", given)[0], run("uniform")[0])


@pytest.mark.parametrize("credit_mode", ["sparse", "uniform", "coca"])
def test_advantages_are_clipped(credit_mode):
    step_weights = coca_like_weights() if credit_mode == "coca" else None
    advantages, info = run(credit_mode, step_weights, adv_clip_max=0.5)
    assert advantages.abs().max().item() == pytest.approx(0.5)
    assert info["adv_clip_frac"] > 0
    if credit_mode != "sparse":
        assert info["step_adv_clip_frac"] > 0


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="coca"):
        run("coca", None)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        run("coca", torch.full((6, 3), 1 / 3))
    with pytest.raises(ValueError, match="sparse"):
        run("dense")
    with pytest.raises(ValueError, match="prompts"):
        compute_step_advantages(
            PROMPTS[:2], REWARDS, None, credit_mode="sparse", num_steps=NUM_STEPS,
            reward_tracker=PerPromptStatTracker(8, 1), step_tracker=None, temporal_alpha=0.0, adv_clip_max=5.0,
        )
    with pytest.raises(ValueError, match="step_tracker"):
        compute_step_advantages(
            PROMPTS, REWARDS, None, credit_mode="uniform", num_steps=NUM_STEPS,
            reward_tracker=PerPromptStatTracker(8, 1), step_tracker=None, temporal_alpha=0.0, adv_clip_max=5.0,
        )
