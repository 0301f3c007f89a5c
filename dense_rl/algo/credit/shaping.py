"""Step 5 of the method: a trajectory's advantage split into step rewards by its step weights."""

from __future__ import annotations

import torch


def shape_step_rewards(advantages: torch.Tensor, step_weights: torch.Tensor, alpha: float) -> torch.Tensor:
    """Step rewards r_t = A * (alpha + (1 - alpha) * G_t), G_t = sum_{t' >= t} s_{t'}; [B, T].

    G_t is the credit still to be earned from step t on, so early steps (which shape the image
    most) see the largest share of the trajectory's advantage.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"temporal alpha must be in [0, 1], got {alpha}")
    advantages = torch.as_tensor(advantages, dtype=torch.float32, device=step_weights.device)
    if step_weights.ndim != 2 or advantages.shape != step_weights.shape[:1]:
        raise ValueError(
            f"advantages must be [B] and step_weights [B, T]; got {tuple(advantages.shape)} "
            f"and {tuple(step_weights.shape)}"
        )
    remaining_credit = step_weights.float().flip(1).cumsum(1).flip(1)
    return advantages.unsqueeze(1) * (alpha + (1 - alpha) * remaining_credit)
