"""PPO-clip loss over denoising steps (DDPO's form, decoupled for off-policy batches) and the Gaussian
KL for a reference penalty."""

from __future__ import annotations

import torch


def ppo_clip_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    adv_clip_max: float,
    behaviour_log_probs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """DDPO's clipped surrogate: mean(max(-A * ratio, -A * clamp(ratio, 1 - eps, 1 + eps))).

    `ratio = exp(log_probs - old_log_probs)`. On-policy, `old_log_probs` are the sampler's own. For a
    batch sampled by an older policy (async mode), pass the *proximal* policy's log-probs (the learner's
    weights when the update began) as `old_log_probs` and the sampler's as `behaviour_log_probs`: the
    ratio is then clipped around the proximal policy and each term is weighted by the importance weight
    exp(old - behaviour) (decoupled PPO, Hilton et al. 2021), so stale samples neither start clipped
    nor count as if they were on-policy.

    All tensors share one shape (typically [B] for one denoising step per row). Returns the scalar
    loss and an info dict of detached 0-d tensors, left on the device so a training step does not
    synchronise: approx_kl = 0.5 * mean((log_probs - old_log_probs)^2), clipfrac = mean(|ratio - 1| >
    eps), ratio_mean, and importance_weight's mean, min and max (1 on-policy).
    """
    if not (log_probs.shape == old_log_probs.shape == advantages.shape):
        raise ValueError(
            f"log_probs {tuple(log_probs.shape)}, old_log_probs {tuple(old_log_probs.shape)} and "
            f"advantages {tuple(advantages.shape)} must have the same shape"
        )
    if behaviour_log_probs is not None and behaviour_log_probs.shape != log_probs.shape:
        raise ValueError(f"behaviour_log_probs {tuple(behaviour_log_probs.shape)} must have the shape of "
                         f"log_probs {tuple(log_probs.shape)}")
    if clip_range <= 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    if adv_clip_max <= 0:
        raise ValueError(f"adv_clip_max must be > 0, got {adv_clip_max}")

    advantages = advantages.detach().clamp(-adv_clip_max, adv_clip_max)
    old_log_probs = old_log_probs.detach()
    log_ratio = log_probs - old_log_probs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    surrogate = torch.maximum(unclipped, clipped)
    if behaviour_log_probs is None:
        importance_weight = torch.ones_like(surrogate)
    else:
        importance_weight = torch.exp(old_log_probs - behaviour_log_probs.detach())
    loss = (importance_weight * surrogate).mean()

    with torch.no_grad():
        info = {
            "approx_kl": 0.5 * (log_ratio**2).mean(),
            "clipfrac": ((ratio - 1.0).abs() > clip_range).float().mean(),
            "ratio_mean": ratio.mean(),
            "importance_weight": importance_weight.mean(),
            "importance_weight_min": importance_weight.min(),
            "importance_weight_max": importance_weight.max(),
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
