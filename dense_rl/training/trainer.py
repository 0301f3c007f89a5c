"""The whole algorithm in one process: sample -> reward -> credit -> advantages -> PPO.

This is the reference the Ray system is measured against (same functions, no distribution), and the
quickest way to read what one epoch does. It draws the same prompts and noise as the driver, leaves
out samples with a NaN/inf reward the same way, and shuffles as learner rank 0 of 1 does
(`update_seed`), so a run with one learner worker can be compared with it exactly.
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from dense_rl.config import Config
from dense_rl.diffusion.pipeline import build_policy, denoiser
from dense_rl.diffusion.sampler import sample_trajectories
from dense_rl.diffusion.trajectories import RewardInputs, Trajectories, to_uint8
from dense_rl.rewards import WeightedRewards
from dense_rl.training.prompts import load_prompts
from dense_rl.training.recipe import (
    epoch_advantages,
    epoch_batches,
    evaluation_sampler_options,
    new_trackers,
    sample_batch,
    update_policy,
)
from dense_rl.training.scoring import finite_rewards, score_trajectories
from dense_rl.training.update import make_grad_scaler, make_optimizer


def sample_epoch(pipe, config: Config, prompts: list[str], epoch: int, version: int = 0):
    """The epoch's batches with the Ray driver's prompts and per-batch noise seeds, so the reference
    loop and the Ray system sample identical batches from identical weights."""
    return Trajectories.concat([sample_batch(pipe, config, batch_prompts, seed, version)
                                for batch_prompts, seed in epoch_batches(config, prompts, epoch)])


@torch.no_grad()
def evaluate(pipe, config: Config, rewards: WeightedRewards, prompts: list[str], seed: int,
             keep_images: list | None = None) -> dict[str, float]:
    """Mean of each reward over one fixed-seed sample per prompt (comparable across checkpoints); the
    uint8 images are appended to `keep_images` when a list is given."""
    generator = torch.Generator().manual_seed(seed)
    trajectories = sample_trajectories(pipe, prompts, **evaluation_sampler_options(config), generator=generator)
    images = to_uint8(trajectories.images)
    if keep_images is not None:
        keep_images.append(images)
    total, components = rewards(RewardInputs.as_float(images), trajectories.prompts)
    return {"reward": float(total.mean()), **{name: float(v.mean()) for name, v in components.items()}}


def credit_profile(cosines: torch.Tensor, step_weights: torch.Tensor | None) -> dict[str, list[float]]:
    """Per denoising step, over the epoch's samples: the mean cosine to the final sample and the mean
    and spread of the step weights (none for sparse credit); what the benchmarks plot."""
    profile = {"cosine_mean_per_step": cosines.mean(0).tolist()}
    if step_weights is not None:
        profile |= {"step_weight_mean_per_step": step_weights.mean(0).tolist(),
                    "step_weight_std_per_step": step_weights.std(0).tolist()}
    return profile


def train(config: Config, *, show_progress: bool = True, keep_policy: dict | None = None) -> list[dict[str, float]]:
    """Train in this process; returns one metrics dict per epoch (and the trained pipeline in
    keep_policy["pipe"] when a dict is given)."""
    torch.manual_seed(config.run.seed)

    pipe, params = build_policy(config)
    if keep_policy is not None:
        keep_policy["pipe"] = pipe
    optimizer = make_optimizer(params, config.train)
    grad_scaler = make_grad_scaler(denoiser(pipe))
    rewards = WeightedRewards(config.rewards, device=config.model.device)
    prompts = load_prompts(config.sample.prompts)
    reward_tracker, step_tracker = new_trackers(config)

    history = []
    asynchronous, pending = config.cluster.max_policy_lag == 1, None
    bar = tqdm(range(config.run.num_epochs), desc="epochs", disable=not show_progress)
    for epoch in bar:
        started = time.perf_counter()
        # Sync: sampled by the weights of this epoch. Async, as in the Ray driver: sampled before the
        # previous update, by the weights one version behind (ppo_update corrects for it).
        trajectories = pending if pending is not None else sample_epoch(pipe, config, prompts, epoch, version=epoch)
        sampled = time.perf_counter()
        scores = score_trajectories(rewards, trajectories.for_reward(), config.credit)
        scored = time.perf_counter()
        good = finite_rewards(scores.rewards, epoch)  # NaN/inf rewards: left out of the update
        rows = torch.nonzero(good).flatten()
        kept = trajectories.select(rows)
        weights = None if scores.step_weights is None else scores.step_weights[good]
        step_advantages, advantage_info = epoch_advantages(config, reward_tracker, step_tracker, kept.prompts,
                                                           scores.rewards[good], weights)
        credited = time.perf_counter()
        if asynchronous and epoch + 1 < config.run.num_epochs:
            pending = sample_epoch(pipe, config, prompts, epoch + 1, version=epoch)
        sampled_ahead = time.perf_counter()
        update_info = update_policy(denoiser(pipe), pipe.scheduler, optimizer, params, kept, step_advantages, config,
                                    epoch=epoch, grad_scaler=grad_scaler)
        updated = time.perf_counter()
        metrics = {
            "epoch": epoch,
            "reward_mean": float(scores.rewards[good].mean()),
            "reward_std": float(scores.rewards[good].std()),
            "bad_rewards": len(good) - len(rows),
            "credit_fallbacks": scores.num_fallbacks,
            "epoch_seconds": updated - started,
            # Stage timings: the benchmarks read what credit assignment costs from these.
            "seconds_sample": (sampled - started) + (sampled_ahead - credited),
            "seconds_score": scored - sampled,
            "seconds_advantages": credited - scored,
            "seconds_update": updated - sampled_ahead,
            **{f"reward/{name}": float(v[torch.isfinite(v)].mean()) for name, v in scores.components.items()},
            **{f"advantage/{k}": float(v) for k, v in advantage_info.items()},
            **update_info,
            **credit_profile(trajectories.cosines[good], weights),
        }
        history.append(metrics)
        bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{update_info.get('approx_kl', 0):.2e}")
    return history
