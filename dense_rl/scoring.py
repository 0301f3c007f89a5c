"""Score trajectories: the final reward per image plus per-step credit weights (the reward role), and
which scored samples may enter the update (the Ray driver and the in-process loop share both)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from dense_rl.config import CreditConfig
from dense_rl.credit import step_weights_for
from dense_rl.diffusion.trajectories import Trajectories
from dense_rl.errors import RunFailed
from dense_rl.rewards import WeightedRewards

log = logging.getLogger("dense_rl")


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
