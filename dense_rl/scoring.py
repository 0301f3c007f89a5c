"""Score trajectories: the final reward per image plus per-step credit weights (the reward role), and
which scored samples may enter the update (the Ray driver and the in-process loop share both)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from dense_rl.config import CreditConfig
from dense_rl.credit import step_weights_for
from dense_rl.diffusion.trajectories import RewardInputs
from dense_rl.errors import RunFailed
from dense_rl.rewards import WeightedRewards

log = logging.getLogger("dense_rl")


@dataclass
class Scores:
    rewards: torch.Tensor  # [B] weighted sum of the configured rewards
    components: dict[str, torch.Tensor]  # name -> [B], each reward before weighting
    step_weights: torch.Tensor | None  # [B, T]; None for sparse credit
    num_fallbacks: int  # CoCA rows that fell back to uniform weights


def score_trajectories(rewards: WeightedRewards, batch: RewardInputs, credit: CreditConfig) -> Scores:
    """The rewards of a batch's images and its step weights (`Trajectories.for_reward()` of a batch)."""
    total, components = rewards(RewardInputs.as_float(batch.images), batch.prompts, version=batch.policy_version)
    boundary_rewards = None
    if credit.mode == "reward_gain":  # the training reward of each window boundary's predicted clean image
        if batch.boundary_images is None:
            raise ValueError("credit.mode reward_gain needs the rollouts to decode the window boundaries "
                             "(sample with sampler_options(sample, credit))")
        num_boundaries = batch.boundary_images.shape[1]
        boundary_prompts = [p for p in batch.prompts for _ in range(num_boundaries)]
        flat, _ = rewards(RewardInputs.as_float(batch.boundary_images.flatten(0, 1)), boundary_prompts)
        boundary_rewards = flat.reshape(len(batch.prompts), num_boundaries)
    step_weights, num_fallbacks = step_weights_for(
        credit.mode, batch.cosines, credit.window_size, boundary_rewards=boundary_rewards, final_rewards=total,
    )
    return Scores(total, components, step_weights, num_fallbacks)


def finite_rewards(rewards: torch.Tensor, epoch: int) -> torch.Tensor:
    """Mask of the rewards that may enter the update. NaN/inf ones are logged; none at all stops the run."""
    good = torch.isfinite(rewards)
    bad = int((~good).sum())
    if bad == len(rewards):
        raise RunFailed(f"rewards: every reward of epoch {epoch} is NaN or infinite ({bad} samples); "
                        "check the reward model and its weights (rewards[].path) before training on them")
    if bad:
        log.warning("epoch %d: %d of %d rewards are NaN or infinite; dropped from the update (bad_rewards)",
                    epoch, bad, len(rewards))
    return good
