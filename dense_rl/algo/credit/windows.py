"""Windows of steps, which the windowed credit modes weight as a unit: k = 0..T-1 in sampling order
(k = 0 is the noisiest step), windows j of w steps, [jw, (j+1)w)."""

from __future__ import annotations

import torch


def check_windows(num_steps: int, window_size: int) -> None:
    if window_size < 1:
        raise ValueError(f"window_size must be >= 1, got {window_size}")
    if num_steps < 1:
        raise ValueError(f"the number of steps must be >= 1, got {num_steps}")
    if num_steps % window_size != 0:
        raise ValueError(
            f"the number of steps ({num_steps}) must be divisible by the credit window size ({window_size})"
        )


def window_boundary_steps(num_steps: int, window_size: int) -> list[int]:
    """The window starts [0, w, 2w, ...]: where the gain modes measure the reward."""
    check_windows(num_steps, window_size)
    return list(range(0, num_steps, window_size))


def normalise_window_gains(gains: torch.Tensor, window_size: int, min_total_gain: float, invalid=None):
    """Window gains [B, J] -> step weights [B, J*w] and the bool [B] fallback mask.

    Step t gets s_t = g_{t // w} / (w * sum_j g_j), so each row sums to 1 (gains, hence weights, may
    be negative). Rows with |sum g| < min_total_gain (or flagged ``invalid``) get uniform 1/T instead.
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
