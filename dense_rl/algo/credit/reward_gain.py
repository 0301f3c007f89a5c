"""``reward_gain``: a step's weight is its window's gain in *reward*. The predicted clean sample at
every window boundary is decoded and scored with the trained reward, and window j earns what the reward
rose across it: R_j is the reward at step j*w (before window j acts), R_J the final sample's, so
g_j = R_{j+1} - R_j and sum_j g_j = R_J - R_0. It costs T/w extra reward evaluations per trajectory
(the final sample's reward is already paid for) and no extra denoiser call.
"""

from __future__ import annotations

import torch

from dense_rl.algo.credit.registry import CreditInputs, CreditMode, register
from dense_rl.algo.credit.windows import normalise_window_gains


def reward_gain_step_weights(
    boundary_rewards: torch.Tensor,
    final_rewards: torch.Tensor,
    window_size: int,
    *,
    min_total_gain: float = 1e-6,
    return_fallback: bool = False,
):
    """Reward-gain step weights [B, J*w] float32; each row sums to 1.

    boundary_rewards [B, J]: R_j at each window start; final_rewards [B]: R_J. Rows with |sum g| <
    ``min_total_gain`` or any non-finite reward fall back to uniform 1/T; ``return_fallback=True``
    also returns that bool [B] mask.
    """
    boundary = torch.as_tensor(boundary_rewards).float()
    if boundary.ndim != 2 or boundary.shape[1] < 1:
        raise ValueError(f"boundary_rewards must be [B, J] with J >= 1 windows, got shape {tuple(boundary.shape)}")
    final = torch.as_tensor(final_rewards, device=boundary.device).float()
    if final.shape != boundary.shape[:1]:
        raise ValueError(
            f"final_rewards must be [B] = [{boundary.shape[0]}] to match boundary_rewards, "
            f"got shape {tuple(final.shape)}"
        )
    if window_size < 1:
        raise ValueError(f"window_size must be >= 1, got {window_size}")
    rewards = torch.cat([boundary, final.unsqueeze(1)], dim=1)  # R_0..R_J
    invalid = ~torch.isfinite(rewards).all(dim=1)
    weights, fallback = normalise_window_gains(rewards.diff(dim=1), window_size, min_total_gain, invalid)
    return (weights, fallback) if return_fallback else weights


def boundary_gain_step_weights(inputs: CreditInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The gain modes' weights (this one and ``ode_gain``): from the rewards at the window boundaries."""
    if inputs.boundary_rewards is None:
        raise ValueError("a reward-gain credit mode needs boundary_rewards [B, T/w] (the rollout's boundary images, scored)")
    weights, fallback = reward_gain_step_weights(inputs.boundary_rewards, inputs.final_rewards, inputs.window_size,
                                                 return_fallback=True)
    if weights.shape[1] != inputs.num_steps:
        raise ValueError(f"boundary_rewards has {weights.shape[1] // inputs.window_size} windows of {inputs.window_size} "
                         f"steps = {weights.shape[1]}, but num_steps is {inputs.num_steps}")
    return weights, fallback


REWARD_GAIN = register(CreditMode("reward_gain", step_weights=boundary_gain_step_weights, windowed=True, boundaries="x0"))
