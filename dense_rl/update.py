"""One PPO update of the LoRA policy on a batch of scored trajectories (every denoising step is a
PPO sample with its own advantage). Shared by the in-process loop and the Ray learner."""

from __future__ import annotations

import contextlib
import math

import torch

from dense_rl.config import TrainConfig
from dense_rl.diffusion.ddim import ddim_step_distribution, ddim_step_with_logprob
from dense_rl.diffusion.sampler import Trajectories, predict_noise
from dense_rl.ppo import gaussian_kl, ppo_clip_loss


def ppo_update(
    unet,
    scheduler,
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    trajectories: Trajectories,
    step_advantages: torch.Tensor,
    train: TrainConfig,
    *,
    eta: float,
    guidance_scale: float,
    generator: torch.Generator,
) -> dict[str, float]:
    """PPO-clip over `train.num_inner_epochs` passes; one optimizer step per `train.batch_size` trajectories.

    `unet` may be wrapped in DistributedDataParallel: gradients are then all-reduced once per
    optimizer step, not once per denoising step. Each trajectory trains on its own random subset of
    `timestep_fraction` of its steps, and each step keeps its own advantage.
    """
    num_trajectories, num_steps = step_advantages.shape
    if num_trajectories != trajectories.batch_size or num_steps != trajectories.num_steps:
        raise ValueError(
            f"step_advantages shape {tuple(step_advantages.shape)} does not match the trajectories "
            f"({trajectories.batch_size} x {trajectories.num_steps} steps)"
        )
    device = next(unet.parameters()).device
    dtype = next(p for p in unet.parameters() if not p.requires_grad).dtype
    scheduler.set_timesteps(num_steps, device=device)
    steps_per_trajectory = max(1, math.ceil(num_steps * train.timestep_fraction))
    base_unet = getattr(unet, "module", unet)
    sums: dict[str, float] = {}
    num_updates = 0

    unet.train()
    for _ in range(train.num_inner_epochs):
        order = torch.randperm(num_trajectories, generator=generator)
        for start in range(0, num_trajectories, train.batch_size):
            rows = order[start : start + train.batch_size]
            batch = trajectories.select(rows)
            advantages = step_advantages[rows]
            # Each row trains on its own random subset of steps, with that step's own advantage.
            step_order = torch.stack([torch.randperm(num_steps, generator=generator) for _ in rows])
            row_index = torch.arange(len(rows))

            optimizer.zero_grad(set_to_none=True)
            for j in range(steps_per_trajectory):
                step = step_order[:, j]
                last = j == steps_per_trajectory - 1
                sync = contextlib.nullcontext() if last or not hasattr(unet, "no_sync") else unet.no_sync()
                with sync:
                    info = _step_loss(
                        unet, base_unet, scheduler, batch, advantages, row_index, step, train,
                        eta=eta, guidance_scale=guidance_scale, device=device, dtype=dtype,
                        loss_scale=1.0 / steps_per_trajectory,
                    )
                for key, value in info.items():
                    sums[key] = sums.get(key, 0.0) + value / steps_per_trajectory
            grad_norm = torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
            optimizer.step()
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(grad_norm)
            num_updates += 1
    unet.eval()
    return {key: value / num_updates for key, value in sums.items()} | {"optimizer_steps": num_updates}


def _step_loss(unet, base_unet, scheduler, batch, advantages, row_index, step, train, *, eta, guidance_scale,
               device, dtype, loss_scale) -> dict[str, float]:
    """Forward + backward of one denoising step for every row of `batch`; returns its statistics."""
    sample = batch.latents[row_index, step].to(device, dtype)
    prev_sample = batch.latents[row_index, step + 1].to(device, dtype)
    timesteps = batch.timesteps[step].to(device)
    prompt_embeds = batch.prompt_embeds.to(device, dtype)
    negative = None if batch.negative_prompt_embeds is None else batch.negative_prompt_embeds.to(device, dtype)

    noise_pred = predict_noise(unet, sample, timesteps, prompt_embeds, negative, guidance_scale)
    _, log_prob, _ = ddim_step_with_logprob(scheduler, noise_pred, timesteps, sample, eta, prev_sample=prev_sample)
    old_log_prob = batch.log_probs[row_index, step].to(device)
    loss, info = ppo_clip_loss(log_prob, old_log_prob, advantages[row_index, step].to(device),
                               train.clip_range, train.adv_clip_max)
    stats = {"policy_loss": float(loss.detach()), **{k: float(v) for k, v in info.items()}}
    if train.kl_beta > 0:
        mean, std, _ = ddim_step_distribution(scheduler, noise_pred, timesteps, sample, eta)
        with torch.no_grad():
            base_unet.disable_adapters()
            try:
                reference_pred = predict_noise(base_unet, sample, timesteps, prompt_embeds, negative, guidance_scale)
            finally:
                base_unet.enable_adapters()
            reference_mean, _, _ = ddim_step_distribution(scheduler, reference_pred, timesteps, sample, eta)
        kl = gaussian_kl(mean.float(), reference_mean.float(), std.float()).mean()
        loss = loss + train.kl_beta * kl
        stats["kl_to_reference"] = float(kl)
    (loss * loss_scale).backward()
    return stats


def make_optimizer(params: list[torch.nn.Parameter], train: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        params, lr=train.lr, betas=(train.adam_beta1, train.adam_beta2),
        weight_decay=train.adam_weight_decay, eps=train.adam_epsilon,
    )
