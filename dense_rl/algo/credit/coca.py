"""``coca`` (CoCA, arXiv 2505.19196): a step's weight is its window's gain in cosine similarity between
the predicted clean sample and the final sample.

1. c_k = cos(flatten(x0_pred_k), flatten(x0)) for k = 0..T-1, and c_T = 1.
2. Windows of c_1..c_T (w steps each) have means m_j; gains g_0 = m_0 - c_0, g_j = m_j - m_{j-1}.
3. s_t = g_{t // w} / (w * sum_j g_j); rows whose total gain is ~0 fall back to 1/T (counted).

The rollout computes the [B, T] cosine curve (`cosine_to_final`), so only that, not every predicted
sample, leaves the actor.
"""

from __future__ import annotations

import torch

from dense_rl.algo.credit.registry import CreditInputs, CreditMode, register
from dense_rl.algo.credit.windows import check_windows, normalise_window_gains


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


def coca_step_weights_from_cosines(
    cosines: torch.Tensor,
    window_size: int,
    *,
    min_total_gain: float = 1e-6,
    return_fallback: bool = False,
):
    """CoCA step weights [B, T] float32 from the cosine curve c_0..c_{T-1} [B, T] (c_T = 1 implied).

    With ``return_fallback=True`` the bool [B] mask of rows that fell back to uniform is returned too.
    """
    if cosines.ndim != 2:
        raise ValueError(f"cosines must be [B, T], got shape {tuple(cosines.shape)}")
    batch_size, num_steps = cosines.shape
    check_windows(num_steps, window_size)
    cosines = cosines.float()
    # c_1..c_T, with c_T = 1 (the final sample is its own prediction).
    shifted = torch.cat([cosines[:, 1:], cosines.new_ones(batch_size, 1)], dim=1)
    window_means = shifted.reshape(batch_size, num_steps // window_size, window_size).mean(dim=2)
    previous = torch.cat([cosines[:, :1], window_means[:, :-1]], dim=1)
    weights, fallback = normalise_window_gains(window_means - previous, window_size, min_total_gain)
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
    sampled result. Rows whose total gain is below ``min_total_gain`` in magnitude fall back to
    uniform 1/T; with ``return_fallback=True`` a bool [B] mask of those rows is returned as well.
    """
    return coca_step_weights_from_cosines(
        cosine_to_final(x0_preds, final), window_size, min_total_gain=min_total_gain, return_fallback=return_fallback
    )


def _step_weights(inputs: CreditInputs) -> tuple[torch.Tensor, torch.Tensor]:
    if inputs.cosines is None:
        raise ValueError("credit mode 'coca' needs cosines [B, T] (see cosine_to_final)")
    return coca_step_weights_from_cosines(inputs.cosines, inputs.window_size, return_fallback=True)


COCA = register(CreditMode("coca", step_weights=_step_weights, windowed=True))
