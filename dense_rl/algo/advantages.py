"""Per-step advantages for PPO from final rewards and step credit weights (steps 4-6 of the method).

Two ways to normalise (``advantages=``): ``per_prompt``, DDPO's running per-prompt tracker over recent
epochs (the paper's setting), or ``group``, GRPO's group-relative advantage within each prompt's
samples of this epoch (Flow-GRPO's setting for SD3.5).
"""

from __future__ import annotations

import numpy as np
import torch

from dense_rl.algo.credit import shape_step_rewards
from dense_rl.algo.normalisers import PerPromptStatTracker, group_normalise

ADVANTAGE_MODES = ("per_prompt", "group")


def _as_numpy(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


def _clip_with_fraction(values: np.ndarray, clip_max: float) -> tuple[np.ndarray, float]:
    clipped_fraction = float(np.mean(np.abs(values) > clip_max)) if values.size else 0.0
    return np.clip(values, -clip_max, clip_max), clipped_fraction


def _validate(prompts, rewards: np.ndarray, step_weights, num_steps: int) -> None:
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be [B] final rewards, got shape {rewards.shape}")
    if len(prompts) != rewards.shape[0]:
        raise ValueError(f"got {len(prompts)} prompts for {rewards.shape[0]} rewards")
    if step_weights is not None and tuple(step_weights.shape) != (rewards.shape[0], num_steps):
        raise ValueError(
            f"step_weights must be [B, T] = {(rewards.shape[0], num_steps)}, got {tuple(step_weights.shape)}"
        )


def _credit_shares(step_weights: torch.Tensor, window_size: int) -> dict:
    """Mean share of credit in the first (noisiest) and last window of steps."""
    weights = step_weights.detach().float().cpu()
    return {
        "credit_first_window": float(weights[:, :window_size].sum(1).mean()),
        "credit_last_window": float(weights[:, -window_size:].sum(1).mean()),
        "credit_negative_frac": float((weights < 0).float().mean()),
    }


def compute_step_advantages(
    prompts: list[str],
    rewards,
    step_weights: torch.Tensor | None,
    *,
    num_steps: int,
    reward_tracker: PerPromptStatTracker | None,
    step_tracker: PerPromptStatTracker | None,
    temporal_alpha: float,
    adv_clip_max: float,
    window_size: int = 1,
    advantages: str = "per_prompt",
    group_std: bool = True,
    trained_steps: range | None = None,
) -> tuple[torch.Tensor, dict]:
    """Advantages [B, T] float32 for every denoising step, and an info dict of scalars.

    1. A = normalised final reward, clipped to +-adv_clip_max.
    2. Without ``step_weights`` (a credit mode without step credit, DDPO): A on every step. With them
       (the mode's weights [B, T], dense_rl.algo.credit): step rewards r = shape_step_rewards(A,
       weights, temporal_alpha), normalised again and clipped. The second stage's statistics are taken
       over ``trained_steps`` only (default: every step), so that a window of trained steps
       (``sample.sde_window``, ``train.step_window``) gets advantages of the same scale wherever it sits;
       the other steps, never trained, get 0.

    ``advantages`` picks the normaliser of both stages:

    - ``"per_prompt"`` (default): ``reward_tracker`` and ``step_tracker`` (per prompt, over a buffer
      of recent epochs; see ``PerPromptStatTracker``). ``group_std`` is ignored.
    - ``"group"`` (GRPO): within each prompt's group, i.e. every sample of that prompt in this call
      (one call = one epoch). Stage 1: A = (r - mean_g) / (std_g + 1e-4); stage 2 does the same over
      the group's rows x trained steps of shaped step rewards. ``group_std=False`` subtracts the mean
      only. std is the population std (ddof=0) and eps 1e-4, as in Flow-GRPO: its
      ``PerPromptStatTracker.update`` (flow_grpo/stat_tracking.py, yifan123/flow_grpo) uses ``np.std``
      + 1e-4 over the prompt's rewards, and ``scripts/train_sd3.py`` calls ``stat_tracker.clear()``
      after every epoch, so its group is that epoch's samples of the prompt. One difference: Flow-GRPO's
      SD3.5 presets set ``sample.global_std = True``, dividing by the std of all rewards of the epoch
      instead of the group's (not offered here).
      The trackers are not used (and may be None). A group of one sample gets advantage 0 on every
      step: GRPO needs ``sample.samples_per_prompt >= 2`` (config validation checks it).

    ``window_size`` only sets which steps the credit-share metrics report on.
    """
    rewards = _as_numpy(rewards)
    _validate(prompts, rewards, step_weights, num_steps)
    if advantages not in ADVANTAGE_MODES:
        raise ValueError(f"unknown advantages {advantages!r}; expected one of {ADVANTAGE_MODES}")
    if adv_clip_max <= 0:
        raise ValueError(f"adv_clip_max must be > 0, got {adv_clip_max}")
    grouped = advantages == "group"
    if not grouped and reward_tracker is None:
        raise ValueError("advantages 'per_prompt' needs a reward_tracker (PerPromptStatTracker)")
    device = step_weights.device if step_weights is not None else torch.device("cpu")

    group_info: dict = {}
    if grouped:
        normalised_rewards, group_info = group_normalise(prompts, rewards, use_std=group_std)
    else:
        normalised_rewards = reward_tracker.update(prompts, rewards)
    trajectory_advantages, adv_clip_frac = _clip_with_fraction(normalised_rewards.astype(np.float64), adv_clip_max)
    info = {
        "reward_mean": float(rewards.mean()) if rewards.size else 0.0,
        "reward_std": float(rewards.std()) if rewards.size else 0.0,
        "adv_mean": float(trajectory_advantages.mean()) if rewards.size else 0.0,
        "adv_std": float(trajectory_advantages.std()) if rewards.size else 0.0,
        "adv_clip_frac": adv_clip_frac,
        **group_info,
    }
    trajectory_tensor = torch.as_tensor(trajectory_advantages, dtype=torch.float32, device=device)

    if step_weights is None:
        step_advantages = trajectory_tensor.unsqueeze(1).expand(-1, num_steps).contiguous()
    else:
        if not grouped and step_tracker is None:
            raise ValueError("step credit needs a step_tracker for the second normalisation")
        info.update(_credit_shares(step_weights, window_size))
        step_rewards = shape_step_rewards(trajectory_tensor, step_weights, temporal_alpha)
        step_rewards_np = step_rewards.cpu().double().numpy()
        columns = slice(None) if trained_steps is None else list(trained_steps)
        if grouped:
            normalised_steps, _ = group_normalise(prompts, step_rewards_np[:, columns], use_std=group_std)
        else:
            normalised_steps = step_tracker.update(prompts, step_rewards_np[:, columns])
        clipped, step_clip_frac = _clip_with_fraction(normalised_steps, adv_clip_max)
        normalised = np.zeros(step_rewards_np.shape, dtype=clipped.dtype)
        normalised[:, columns] = clipped
        step_advantages = torch.as_tensor(normalised, dtype=torch.float32, device=device)
        info["step_reward_mean"] = float(step_rewards[:, columns].mean()) if rewards.size else 0.0
        info["step_adv_clip_frac"] = step_clip_frac

    info["step_adv_mean"] = float(step_advantages.mean()) if rewards.size else 0.0
    info["step_adv_std"] = float(step_advantages.std(unbiased=False)) if rewards.size else 0.0
    return step_advantages, info
