"""How the configuration becomes the calls of one epoch's stages (sample, advantages, update): the one
place the Ray driver and roles and the in-process trainer read them from, so that both sample the same
batches, normalise the same way and update with the same settings.

The driver reads this module but never samples or trains, so the diffusion stack (diffusers,
transformers, peft: seconds of imports) is imported only by the functions that run it.
"""

from __future__ import annotations

import dataclasses

import torch

from dense_rl.algo.advantages import compute_step_advantages
from dense_rl.algo.credit import credit_mode
from dense_rl.algo.normalisers import PerPromptStatTracker
from dense_rl.config import Config
from dense_rl.diffusion.trajectories import Trajectories, trained_step_range
from dense_rl.training.prompts import choose_prompts
from dense_rl.training.seeds import batch_seed, prompt_rng, update_seed


def epoch_batches(config: Config, prompts: list[str], epoch: int) -> list[tuple[list[str], int]]:
    """(prompts, noise seed) of each rollout batch of `epoch`: a function of the run's seed and the
    epoch alone, so a resumed run, a re-issued batch and the in-process trainer sample the same."""
    sample, seed = config.sample, config.run.seed
    rng = prompt_rng(seed, epoch)
    return [(choose_prompts(rng, prompts, sample.batch_size, sample.samples_per_prompt), batch_seed(seed, epoch, batch))
            for batch in range(sample.num_batches_per_epoch)]


def sampler_options(config: Config) -> dict:
    """sample_trajectories' keyword arguments for training batches: the sampler settings, and what the
    credit mode needs at the window boundaries."""
    sample, credit = config.sample, config.credit
    return dict(num_steps=sample.num_steps, guidance_scale=sample.guidance_scale, eta=sample.eta,
                noise_level=sample.sde_noise_level, sde_window=sample.sde_window, negative_prompt=sample.negative_prompt,
                resolution=sample.resolution, boundaries=credit_mode(credit.mode).boundaries,
                window_size=credit.window_size)


def evaluation_sampler_options(config: Config, pipe) -> dict:
    """sample_trajectories' keyword arguments for evaluation samples (held-out prompts, fixed noise):
    `evaluation.num_steps` and `guidance_scale`, deterministic steps for `evaluation.sampler: ode`, and
    for `auto` on a flow model (Flow-GRPO evaluates with the ODE; DDIM keeps its training sampler)."""
    from dense_rl.diffusion.pipeline import is_flow

    evaluation, sample = config.evaluation, config.sample
    deterministic = evaluation.sampler == "ode" or (evaluation.sampler == "auto" and is_flow(pipe))
    num_steps = evaluation.num_steps or sample.num_steps
    return sampler_options(config) | dict(
        num_steps=num_steps, boundaries=None, deterministic=deterministic,
        guidance_scale=sample.guidance_scale if evaluation.guidance_scale is None else evaluation.guidance_scale,
        # A window of stochastic steps is a training choice; evaluation samples every step alike.
        sde_window=[] if num_steps != sample.num_steps else sample.sde_window)


def sample_batch(pipe, config: Config, prompts: list[str], seed: int, version: int = 0) -> Trajectories:
    """One training batch sampled with `pipe`'s current weights, tagged with policy `version`."""
    from dense_rl.diffusion.sampler import sample_trajectories

    return sample_trajectories(pipe, prompts, **sampler_options(config),
                               generator=torch.Generator().manual_seed(seed), policy_version=version)


def new_trackers(config: Config) -> tuple[PerPromptStatTracker, PerPromptStatTracker]:
    """The per-prompt normalisers of both stages (used by `credit.advantages: per_prompt`)."""
    credit = config.credit
    return (PerPromptStatTracker(credit.buffer_size, credit.min_count),
            PerPromptStatTracker(credit.buffer_size, credit.min_count))


def epoch_advantages(config: Config, reward_tracker, step_tracker, prompts: list[str], rewards: torch.Tensor,
                     step_weights: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
    """Per-step advantages [B, T] of an epoch's kept samples (finite rewards), and their statistics."""
    credit, sample = config.credit, config.sample
    return compute_step_advantages(
        prompts, rewards, step_weights, num_steps=sample.num_steps, reward_tracker=reward_tracker,
        step_tracker=step_tracker, temporal_alpha=credit.temporal_alpha, adv_clip_max=config.train.adv_clip_max,
        window_size=credit.window_size, advantages=credit.advantages, group_std=credit.group_std,
        trained_steps=trained_step_range(sample.num_steps, sample.sde_window, config.train.step_window),
    )


def rows_with_signal(step_advantages: torch.Tensor, min_rows: int) -> torch.Tensor:
    """Bool mask of the rows to train: those whose advantages are not all zero (a group of ties, or a
    prompt sampled once, teaches nothing; Flow-GRPO leaves them out too). Every row when fewer than
    `min_rows` (the learner ranks) would be left."""
    signal = step_advantages.abs().sum(dim=1) != 0
    return signal if int(signal.sum()) >= min_rows else torch.ones_like(signal)


def update_policy(model, scheduler, optimizer, params, trajectories: Trajectories, step_advantages: torch.Tensor,
                  config: Config, *, epoch: int, rank: int = 0, world_size: int = 1, grad_scaler=None,
                  fetch_proximal=None) -> dict[str, float]:
    """PPO on one learner rank's share of an epoch (the whole epoch in-process: rank 0 of 1), with that
    rank's shuffle seed and its share of every optimizer step's trajectories."""
    from dense_rl.training.update import ppo_update

    sample = config.sample
    return ppo_update(
        model, scheduler, optimizer, params, trajectories, step_advantages,
        dataclasses.replace(config.train, batch_size=config.train.batch_size // world_size),
        eta=sample.eta, noise_level=sample.sde_noise_level, guidance_scale=sample.guidance_scale,
        generator=torch.Generator().manual_seed(update_seed(config.run.seed, epoch, rank)),
        learner_version=epoch, grad_scaler=grad_scaler, fetch_proximal=fetch_proximal,
    )


def rescore(model, scheduler, trajectories: Trajectories, config: Config) -> torch.Tensor:
    """[B, T] log-probs of the stored actions under `model`'s current weights (decoupled PPO's proximal
    policy), computed for a learner by a rollout actor that holds its weights."""
    from dense_rl.training.update import rescore_trajectories

    sample = config.sample
    return rescore_trajectories(model, scheduler, trajectories, eta=sample.eta, noise_level=sample.sde_noise_level,
                                guidance_scale=sample.guidance_scale, batch_size=config.train.batch_size,
                                step_window=config.train.step_window)
