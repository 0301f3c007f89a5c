"""Step-level credit assignment: how much of a trajectory's final reward each denoising step earns.

Four modes share the rest of the pipeline:

- ``sparse`` (DDPO): no step weights; every step gets the trajectory advantage.
- ``uniform`` (UCA): every step gets weight 1/T.
- ``coca`` (CoCA, arXiv 2505.19196): a step's weight is its window's gain in cosine similarity
  between the predicted clean sample and the final sample. The rollout computes the [B, T] cosine
  curve (``cosine_to_final``) so only that, not every predicted sample, leaves the actor.
- ``reward_gain``: a step's weight is its window's gain in *reward*: the predicted clean sample at
  every window boundary is scored with the training reward, and window j earns what the reward rose
  across it. It costs ``num_steps / window_size`` extra reward evaluations per trajectory (the
  boundaries ``window_boundary_steps``; the final sample's reward is already paid for).

Both dense modes normalise window gains g_j the same way: step t gets s_t = g_{t // w} / (w * sum_j g_j),
so each row sums to 1 (gains, hence weights, may be negative); rows whose total gain is ~0 fall back
to uniform 1/T and are counted.

Steps are indexed k = 0..T-1 in sampling order (k = 0 is the noisiest step).
"""

from __future__ import annotations

import torch

CREDIT_MODES = ("sparse", "uniform", "coca", "reward_gain")


def _validate_windows(num_steps: int, window_size: int) -> None:
    if window_size < 1:
        raise ValueError(f"window_size must be >= 1, got {window_size}")
    if num_steps < 1:
        raise ValueError(f"the number of steps must be >= 1, got {num_steps}")
    if num_steps % window_size != 0:
        raise ValueError(
            f"the number of steps ({num_steps}) must be divisible by the credit window size ({window_size})"
        )


def window_boundary_steps(num_steps: int, window_size: int) -> list[int]:
    """Steps whose x0 predictions ``reward_gain`` scores: [0, w, 2w, ...], one per window start."""
    _validate_windows(num_steps, window_size)
    return list(range(0, num_steps, window_size))


def cosine_to_final(x0_preds: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    """cos(flatten(x0_preds[:, k]), flatten(final)) for every step: [B, T] float32."""
    if x0_preds.ndim < 3:
        raise ValueError(f"x0_preds must be [B, T, ...] with at least one sample dim, got shape {tuple(x0_preds.shape)}")
    if x0_preds.shape[0] != final.shape[0] or x0_preds.shape[2:] != final.shape[1:]:
        raise ValueError(
            f"x0_preds[:, k] has shape {tuple(x0_preds[:, 0].shape)} but final has shape {tuple(final.shape)}; "
            "they must match"
        )
    batch_size, num_steps = x0_preds.shape[:2]
    # float32: fp16 dot products over a whole latent overflow or lose the small gains we need.
    preds = x0_preds.reshape(batch_size, num_steps, -1).float()
    target = final.reshape(batch_size, 1, -1).float()
    return torch.nn.functional.cosine_similarity(preds, target, dim=-1, eps=1e-8)


def _normalise_window_gains(gains: torch.Tensor, window_size: int, min_total_gain: float, invalid=None):
    """Window gains [B, J] -> step weights [B, J*w] summing to 1 per row, and the bool [B] fallback mask.

    Rows with |sum g| < min_total_gain (or flagged ``invalid``) get uniform 1/T instead.
    """
    total_gain = gains.sum(dim=1, keepdim=True)
    fallback = total_gain.abs().squeeze(1) < min_total_gain
    if invalid is not None:
        fallback = fallback | invalid
    # Guard the division so fallback rows stay finite before they are replaced.
    safe_total = torch.where(fallback.unsqueeze(1), torch.ones_like(total_gain), total_gain)
    weights = (gains / (window_size * safe_total)).repeat_interleave(window_size, dim=1)
    uniform = torch.full_like(weights, 1.0 / weights.shape[1])
    return torch.where(fallback.unsqueeze(1), uniform, weights), fallback


def coca_step_weights_from_cosines(
    cosines: torch.Tensor,
    window_size: int,
    *,
    min_total_gain: float = 1e-6,
    return_fallback: bool = False,
):
    """CoCA step weights [B, T] float32 from the cosine curve c_0..c_{T-1} [B, T] (c_T = 1 implied).

    Windows of c_1..c_T have means m_j; gains g_0 = m_0 - c_0, g_j = m_j - m_{j-1}. With
    ``return_fallback=True`` the bool [B] mask of rows that fell back to uniform is returned too.
    """
    if cosines.ndim != 2:
        raise ValueError(f"cosines must be [B, T], got shape {tuple(cosines.shape)}")
    batch_size, num_steps = cosines.shape
    _validate_windows(num_steps, window_size)
    cosines = cosines.float()
    # c_1..c_T, with c_T = 1 (the final sample is its own prediction).
    shifted = torch.cat([cosines[:, 1:], cosines.new_ones(batch_size, 1)], dim=1)
    window_means = shifted.reshape(batch_size, num_steps // window_size, window_size).mean(dim=2)
    previous = torch.cat([cosines[:, :1], window_means[:, :-1]], dim=1)
    weights, fallback = _normalise_window_gains(window_means - previous, window_size, min_total_gain)
    return (weights, fallback) if return_fallback else weights


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
    return coca_step_weights_from_cosines(
        cosine_to_final(x0_preds, final), window_size, min_total_gain=min_total_gain, return_fallback=return_fallback
    )


def reward_gain_step_weights(
    boundary_rewards: torch.Tensor,
    final_rewards: torch.Tensor,
    window_size: int,
    *,
    min_total_gain: float = 1e-6,
    return_fallback: bool = False,
):
    """Reward-gain step weights [B, J*w] float32; each row sums to 1.

    boundary_rewards [B, J]: R_j = reward of the x0 prediction at step j*w (before window j acts);
    final_rewards [B]: R_J, the final sample's reward. Window j's gain is g_j = R_{j+1} - R_j, so
    sum_j g_j = R_J - R_0. Rows with |sum g| < ``min_total_gain`` or any non-finite reward fall back
    to uniform 1/T; ``return_fallback=True`` also returns that bool [B] mask.
    """
    boundary = torch.as_tensor(boundary_rewards).float()
    if boundary.ndim != 2 or boundary.shape[1] < 1:
        raise ValueError(f"boundary_rewards must be [B, J] with J >= 1 windows, got shape {tuple(boundary.shape)}")
    final = torch.as_tensor(final_rewards, device=boundary.device).float()
    if final.shape != boundary.shape[:1]:
        raise ValueError(
            f"final_rewards must be [B] = [{boundary.shape[0]}] to match boundary_rewards, "
            f"got shape {tuple(final.shape)}"
        )
    if window_size < 1:
        raise ValueError(f"window_size must be >= 1, got {window_size}")
    rewards = torch.cat([boundary, final.unsqueeze(1)], dim=1)  # R_0..R_J
    invalid = ~torch.isfinite(rewards).all(dim=1)
    weights, fallback = _normalise_window_gains(rewards.diff(dim=1), window_size, min_total_gain, invalid)
    return (weights, fallback) if return_fallback else weights


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
    mode: str,
    cosines: torch.Tensor | None,
    window_size: int,
    *,
    boundary_rewards: torch.Tensor | None = None,
    final_rewards: torch.Tensor | None = None,
    num_steps: int | None = None,
) -> tuple[torch.Tensor | None, int]:
    """Weights for a credit mode and the number of rows that fell back to uniform.

    "coca" -> from ``cosines`` [B, T]; "uniform" -> 1/T with T = cosines.shape[1] (or ``num_steps``
    when cosines is None, B then from the rewards); "sparse" -> (None, 0); "reward_gain" -> from
    ``boundary_rewards`` [B, T/w] and ``final_rewards`` [B] (``num_steps``, if given, is checked).
    """
    if mode not in CREDIT_MODES:
        raise ValueError(f"unknown credit mode {mode!r}; expected one of {CREDIT_MODES}")
    if mode == "sparse":
        return None, 0
    if mode == "coca":
        if cosines is None:
            raise ValueError("credit mode 'coca' needs cosines [B, T] (see cosine_to_final)")
        weights, fallback = coca_step_weights_from_cosines(cosines, window_size, return_fallback=True)
        return weights, int(fallback.sum())
    if mode == "uniform":
        if cosines is not None:
            return uniform_step_weights(cosines.shape[0], cosines.shape[1], device=cosines.device), 0
        rewards = final_rewards if final_rewards is not None else boundary_rewards
        if num_steps is None or rewards is None:
            raise ValueError("credit mode 'uniform' needs cosines [B, T], or num_steps and final_rewards [B] for B")
        rewards = torch.as_tensor(rewards)
        return uniform_step_weights(rewards.shape[0], num_steps, device=rewards.device), 0
    # reward_gain
    if boundary_rewards is None or final_rewards is None:
        raise ValueError("credit mode 'reward_gain' needs boundary_rewards [B, T/w] and final_rewards [B]")
    weights, fallback = reward_gain_step_weights(boundary_rewards, final_rewards, window_size, return_fallback=True)
    if num_steps is not None and weights.shape[1] != num_steps:
        raise ValueError(
            f"boundary_rewards has {weights.shape[1] // window_size} windows of {window_size} steps "
            f"= {weights.shape[1]}, but num_steps is {num_steps}"
        )
    return weights, int(fallback.sum())
