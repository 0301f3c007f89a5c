"""Score trajectories: the final reward per image plus per-step credit weights (the reward role), and
which scored samples may enter the update (the Ray driver and the in-process loop share both)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from dense_rl.algo.credit import CreditInputs, credit_mode
from dense_rl.config import CreditConfig, RunFailed
from dense_rl.diffusion.trajectories import RewardInputs
from dense_rl.rewards import WeightedRewards

log = logging.getLogger("dense_rl")


@dataclass
class Scores:
    rewards: torch.Tensor  # [B] weighted sum of the configured rewards
    components: dict[str, torch.Tensor]  # name -> [B], each reward before weighting
    step_weights: torch.Tensor | None  # [B, T]; None for sparse credit
    num_fallbacks: int  # CoCA rows that fell back to uniform weights
    # What the rollout paid for the credit mode's boundary images: denoiser calls per trajectory, seconds.
    boundary_model_calls: int = 0
    boundary_seconds: float = 0.0


@dataclass
class ScoredBatch:
    """What the driver and the run's records need from a scored batch, without its heavy tensors."""

    prompts: list[str]
    policy_version: int
    scores: Scores
    preview: torch.Tensor  # uint8 [n, 3, H, W]: the first images, for the epoch's grid
    monitors: dict[str, float] = field(default_factory=dict)  # image monitors of the batch (training/monitors.py)


def score_trajectories(rewards: WeightedRewards, batch: RewardInputs, credit: CreditConfig) -> Scores:
    """The rewards of a batch's images and its step weights (`Trajectories.for_reward()` of a batch)."""
    total, components = rewards(RewardInputs.as_float(batch.images), batch.prompts)
    mode = credit_mode(credit.mode)
    boundary_rewards = None
    if mode.boundaries is not None:  # the training reward of the image at each window boundary
        if batch.boundary_images is None:
            raise ValueError(f"credit.mode {credit.mode} needs the rollouts to hand over the window boundaries' "
                             "images (sample with dense_rl.training.recipe.sampler_options)")
        num_boundaries = batch.boundary_images.shape[1]
        boundary_prompts = [p for p in batch.prompts for _ in range(num_boundaries)]
        flat, _ = rewards(RewardInputs.as_float(batch.boundary_images.flatten(0, 1)), boundary_prompts)
        boundary_rewards = flat.reshape(len(batch.prompts), num_boundaries)
    if not mode.shapes_step_rewards:
        return Scores(total, components, None, 0)
    step_weights, fallback = mode.step_weights(CreditInputs(total, batch.cosines.shape[1], credit.window_size,
                                                            cosines=batch.cosines, boundary_rewards=boundary_rewards))
    return Scores(total, components, step_weights, int(fallback.sum()), batch.boundary_model_calls,
                  batch.boundary_seconds)


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
