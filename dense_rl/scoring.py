"""Score trajectories: the final reward per image plus per-step credit weights (the reward role)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dense_rl.config import CreditConfig
from dense_rl.credit import step_weights_for
from dense_rl.diffusion.sampler import Trajectories
from dense_rl.rewards import WeightedRewards


@dataclass
class Scores:
    rewards: torch.Tensor  # [B] weighted sum of the configured rewards
    components: dict[str, torch.Tensor]  # name -> [B], each reward before weighting
    step_weights: torch.Tensor | None  # [B, T]; None for sparse credit
    num_fallbacks: int  # CoCA rows that fell back to uniform weights


def score_trajectories(rewards: WeightedRewards, trajectories: Trajectories, credit: CreditConfig) -> Scores:
    total, components = rewards(trajectories.images, trajectories.prompts, version=trajectories.policy_version)
    step_weights, num_fallbacks = step_weights_for(
        credit.mode, trajectories.x0_preds, trajectories.final_samples, credit.window_size
    )
    return Scores(total, components, step_weights, num_fallbacks)
