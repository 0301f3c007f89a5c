"""``uniform`` (UCA, the paper's uniform credit): every step gets weight 1/T."""

from __future__ import annotations

import torch

from dense_rl.algo.credit.registry import CreditInputs, CreditMode, register


def uniform_step_weights(batch_size: int, num_steps: int, device=None) -> torch.Tensor:
    """1/T on every step, [B, T] float32."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return torch.full((batch_size, num_steps), 1.0 / num_steps, dtype=torch.float32, device=device)


def _step_weights(inputs: CreditInputs) -> tuple[torch.Tensor, torch.Tensor]:
    rewards = inputs.final_rewards
    weights = uniform_step_weights(rewards.shape[0], inputs.num_steps, device=rewards.device)
    return weights, torch.zeros(rewards.shape[0], dtype=torch.bool, device=rewards.device)


UNIFORM = register(CreditMode("uniform", step_weights=_step_weights))
