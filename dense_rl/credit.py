"""Step-level credit assignment: how much of a trajectory's final reward each denoising step earns.

Three modes share the rest of the pipeline:

- ``sparse`` (DDPO): no step weights; every step gets the trajectory advantage.
- ``uniform`` (UCA): every step gets weight 1/T.
- ``coca`` (CoCA, arXiv 2505.19196): a step's weight is its window's gain in cosine similarity
  between the predicted clean sample and the final sample.

Steps are indexed k = 0..T-1 in sampling order (k = 0 is the noisiest step).
"""

from __future__ import annotations

import torch

CREDIT_MODES = ("sparse", "uniform", "coca")


def _cosine_to_final(x0_preds: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    """cos(flatten(x0_preds[:, k]), flatten(final)) for every step: [B, T] float32."""
    batch_size, num_steps = x0_preds.shape[:2]
    # float32: fp16 dot products over a whole latent overflow or lose the small gains we need.
    preds = x0_preds.reshape(batch_size, num_steps, -1).float()
    target = final.reshape(batch_size, 1, -1).float()
    return torch.nn.functional.cosine_similarity(preds, target, dim=-1, eps=1e-8)


def _window_gains(cosines: torch.Tensor, window_size: int) -> torch.Tensor:
    """Gains per window from c_0..c_{T-1}: g_0 = m_0 - c_0, g_j = m_j - m_{j-1}; [B, T/w]."""
    batch_size, num_steps = cosines.shape
    # c_1..c_T, with c_T = 1 (the final sample is its own prediction).
    shifted = torch.cat([cosines[:, 1:], cosines.new_ones(batch_size, 1)], dim=1)
    window_means = shifted.reshape(batch_size, num_steps // window_size, window_size).mean(dim=2)
    previous = torch.cat([cosines[:, :1], window_means[:, :-1]], dim=1)
    return window_means - previous


def _validate_coca_inputs(x0_preds: torch.Tensor, final: torch.Tensor, window_size: int) -> None:
    if x0_preds.ndim < 3:
        raise ValueError(f"x0_preds must be [B, T, ...] with at least one sample dim, got shape {tuple(x0_preds.shape)}")
    if x0_preds.shape[0] != final.shape[0] or x0_preds.shape[2:] != final.shape[1:]:
        raise ValueError(
            f"x0_preds[:, k] has shape {tuple(x0_preds[:, 0].shape)} but final has shape {tuple(final.shape)}; "
            "they must match"
        )
    if window_size < 1:
        raise ValueError(f"window_size must be >= 1, got {window_size}")
    num_steps = x0_preds.shape[1]
    if num_steps % window_size != 0:
        raise ValueError(
            f"the number of steps ({num_steps}) must be divisible by the CoCA window size ({window_size})"
        )


def coca_step_weights(
    x0_preds: torch.Tensor,
    final: torch.Tensor,
    window_size: int,
    *,
    min_total_gain: float = 1e-6,
    return_fallback: bool = False,
):
    """CoCA step weights [B, T] float32; each row sums to 1.

    x0_preds [B, T, ...] are the predicted clean samples at steps k = 0..T-1, final [B, ...] the
    sampled result. s_k = g_{k // w} / (w * sum_j g_j). Rows whose total gain is below
    ``min_total_gain`` in magnitude fall back to uniform 1/T; with ``return_fallback=True`` a
    bool [B] mask of those rows is returned as well.
    """
    _validate_coca_inputs(x0_preds, final, window_size)
    batch_size, num_steps = x0_preds.shape[:2]
    gains = _window_gains(_cosine_to_final(x0_preds, final), window_size)
    total_gain = gains.sum(dim=1, keepdim=True)
    fallback = total_gain.abs().squeeze(1) < min_total_gain
    # Guard the division so fallback rows stay finite before they are replaced.
    safe_total = torch.where(fallback.unsqueeze(1), torch.ones_like(total_gain), total_gain)
    window_weights = gains / (window_size * safe_total)
    weights = window_weights.repeat_interleave(window_size, dim=1)
    uniform = torch.full_like(weights, 1.0 / num_steps)
    weights = torch.where(fallback.unsqueeze(1), uniform, weights)
    if return_fallback:
        return weights, fallback
    return weights


def uniform_step_weights(batch_size: int, num_steps: int, device=None) -> torch.Tensor:
    """UCA weights: 1/T on every step, [B, T] float32."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return torch.full((batch_size, num_steps), 1.0 / num_steps, dtype=torch.float32, device=device)


def shape_step_rewards(advantages: torch.Tensor, step_weights: torch.Tensor, alpha: float) -> torch.Tensor:
    """Step rewards r_t = A * (alpha + (1 - alpha) * G_t), G_t = sum_{t' >= t} s_{t'}; [B, T].

    G_t is the credit still to be earned from step t on, so early steps (which shape the image
    most) see the largest share of the trajectory's advantage.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"temporal alpha must be in [0, 1], got {alpha}")
    advantages = torch.as_tensor(advantages, dtype=torch.float32, device=step_weights.device)
    if step_weights.ndim != 2 or advantages.shape != step_weights.shape[:1]:
        raise ValueError(
            f"advantages must be [B] and step_weights [B, T]; got {tuple(advantages.shape)} "
            f"and {tuple(step_weights.shape)}"
        )
    remaining_credit = step_weights.float().flip(1).cumsum(1).flip(1)
    return advantages.unsqueeze(1) * (alpha + (1 - alpha) * remaining_credit)


def step_weights_for(
    mode: str, x0_preds: torch.Tensor, final: torch.Tensor, window_size: int
) -> tuple[torch.Tensor | None, int]:
    """Weights for a credit mode and the number of CoCA rows that fell back to uniform.

    "coca" -> (CoCA weights, fallback count); "uniform" -> (1/T weights, 0); "sparse" -> (None, 0).
    """
    if mode == "coca":
        weights, fallback = coca_step_weights(x0_preds, final, window_size, return_fallback=True)
        return weights, int(fallback.sum())
    if mode == "uniform":
        return uniform_step_weights(x0_preds.shape[0], x0_preds.shape[1], device=x0_preds.device), 0
    if mode == "sparse":
        return None, 0
    raise ValueError(f"unknown credit mode {mode!r}; expected one of {CREDIT_MODES}")
