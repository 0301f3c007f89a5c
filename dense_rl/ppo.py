"""PPO-clip loss over denoising steps (DDPO's form) and the Gaussian KL for a reference penalty."""

from __future__ import annotations

import torch


def ppo_clip_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    adv_clip_max: float,
) -> tuple[torch.Tensor, dict]:
    """DDPO's clipped surrogate: mean(max(-A * ratio, -A * clamp(ratio, 1 - eps, 1 + eps))).

    All three tensors share one shape (typically [B] for one denoising step per row). Returns the
    scalar loss and an info dict of detached 0-d tensors (call ``float()`` on them when logging;
    they stay on the device so a training step does not have to synchronise):
    approx_kl = 0.5 * mean((log_probs - old_log_probs)^2), clipfrac = mean(|ratio - 1| > eps),
    ratio_mean = mean(ratio).
    """
    if not (log_probs.shape == old_log_probs.shape == advantages.shape):
        raise ValueError(
            f"log_probs {tuple(log_probs.shape)}, old_log_probs {tuple(old_log_probs.shape)} and "
            f"advantages {tuple(advantages.shape)} must have the same shape"
        )
    if clip_range <= 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    if adv_clip_max <= 0:
        raise ValueError(f"adv_clip_max must be > 0, got {adv_clip_max}")

    advantages = advantages.detach().clamp(-adv_clip_max, adv_clip_max)
    log_ratio = log_probs - old_log_probs.detach()
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()

    with torch.no_grad():
        info = {
            "approx_kl": 0.5 * (log_ratio**2).mean(),
            "clipfrac": ((ratio - 1.0).abs() > clip_range).float().mean(),
            "ratio_mean": ratio.mean(),
        }
    return loss, info


def gaussian_kl(mean_p: torch.Tensor, mean_q: torch.Tensor, std) -> torch.Tensor:
    """KL(N(mean_p, std^2) || N(mean_q, std^2)) per batch row, [B] float32.

    Equal variances leave only (mean_p - mean_q)^2 / (2 std^2); it is averaged over the non-batch
    dims, the same convention as the step log-probs, so beta * KL sits on the log-prob scale.
    ``std`` is a float or a tensor broadcastable to the means (e.g. [B, 1, 1, 1] from the DDIM step).
    """
    if mean_p.shape != mean_q.shape:
        raise ValueError(f"mean_p {tuple(mean_p.shape)} and mean_q {tuple(mean_q.shape)} must have the same shape")
    if mean_p.ndim < 1:
        raise ValueError("means must have a batch dimension")
    std = torch.as_tensor(std, dtype=torch.float32, device=mean_p.device)
    kl = (mean_p.float() - mean_q.float()) ** 2 / (2 * std**2)
    return kl.mean(dim=tuple(range(1, mean_p.ndim))) if mean_p.ndim > 1 else kl
