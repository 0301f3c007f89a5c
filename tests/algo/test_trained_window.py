"""The second normalisation stage over the trained steps only, and GRPO's eps for near-ties: a window of
trained steps gets advantages of the same scale wherever it sits in the trajectory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dense_rl.algo.advantages import compute_step_advantages
from dense_rl.algo.normalisers import PerPromptStatTracker, group_normalise

STEPS = 10
PROMPTS = ["a", "a", "a", "a", "b", "b", "b", "b"]


def coca_like_weights(seed: int = 0) -> torch.Tensor:
    """Positive weights that fall along the trajectory (early steps earn most, as CoCA's do), rows summing to 1."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.linspace(2.0, 0.2, STEPS).expand(len(PROMPTS), -1) * (0.5 + torch.rand(len(PROMPTS), STEPS,
                                                                                            generator=generator))
    return weights / weights.sum(1, keepdim=True)


def advantages(window: range | None, mode: str):
    rewards = np.array([1.0, 2.0, 4.0, 3.0, 7.0, 5.0, 6.0, 9.0])
    trackers = dict(reward_tracker=PerPromptStatTracker(32, 1), step_tracker=PerPromptStatTracker(32, 1))
    return compute_step_advantages(PROMPTS, rewards, coca_like_weights(), num_steps=STEPS, temporal_alpha=0.0,
                                   adv_clip_max=100.0, advantages=mode, trained_steps=window,
                                   **(trackers if mode == "per_prompt" else dict(reward_tracker=None, step_tracker=None)))


@pytest.mark.parametrize("mode", ["per_prompt", "group"])
def test_moving_the_window_does_not_rescale_its_advantages(mode):
    """Taken over all T steps, the step rewards of steps never trained (ODE steps outside the window) set
    the scale: on this data the early window [0, 5) and the late one [5, 10) would get different stds.
    Over the trained steps only, each window's advantages have mean 0 and std 1 within each prompt, and
    the untrained steps get none."""
    early, late = range(0, 5), range(5, 10)
    for window in (early, late):
        result, _ = advantages(window, mode)
        inside, outside = result[:, list(window)], result[:, [k for k in range(STEPS) if k not in window]]
        assert torch.equal(outside, torch.zeros_like(outside))
        for prompt in ("a", "b"):
            rows = inside[[i for i, p in enumerate(PROMPTS) if p == prompt]]
            assert rows.mean().item() == pytest.approx(0.0, abs=1e-5)
            assert rows.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)
    # What the all-steps statistics did to the same windows: different scales (the bug this fixes).
    everything, _ = advantages(None, mode)
    early_std = everything[:, list(early)].std(unbiased=False).item()
    late_std = everything[:, list(late)].std(unbiased=False).item()
    assert early_std / late_std > 1.5


def test_every_step_trained_is_the_all_steps_normalisation():
    """trained_steps covering every step changes nothing, bit for bit (DDIM runs without windows)."""
    for mode in ("per_prompt", "group"):
        assert torch.equal(advantages(range(STEPS), mode)[0], advantages(None, mode)[0])


def test_group_near_ties_stay_near_zero():
    """Flow-GRPO's eps 1e-4: two rewards 1e-6 apart are a tie, not a +-0.33 signal (eps 1e-6 gave that)."""
    normalised, stats = group_normalise(["p", "p", "q", "q"], np.array([1.0, 1.0 + 1e-6, 0.0, 2.0]))
    assert np.abs(normalised[:2]).max() < 0.01
    np.testing.assert_allclose(normalised[2:], [-1 / 1.0001, 1 / 1.0001], rtol=1e-6)  # std 1, eps 1e-4
    assert stats["group_zero_std_frac"] == 0.0  # not an exact tie: it still counts as a group with spread
