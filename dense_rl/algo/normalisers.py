"""Normalisation of rewards for both CoCA stages: per prompt over recent epochs (DDPO's stat tracker),
or within each prompt's group of samples of one epoch (GRPO's group-relative advantage)."""

from __future__ import annotations

from collections import deque

import numpy as np

_STD_EPS = 1e-6  # DDPO's tracker
# Flow-GRPO's (np.std + 1e-4): with 1e-6, two rewards 1e-6 apart would get advantages of +-0.33.
_GROUP_STD_EPS = 1e-4


class PerPromptStatTracker:
    """Per-prompt running normalisation (DDPO's tracker), used for both normalisation stages.

    Each prompt keeps a buffer of its most recent ``buffer_size`` rows (trajectories), spanning
    recent epochs. A row is one value (final reward) or T values (step rewards of one trajectory).
    This batch's rows of a prompt are normalised with the mean and std of every value in that
    prompt's buffer, after this batch's rows are added. While the buffer holds fewer than
    ``min_count`` rows, the whole current batch's mean and std are used instead.
    """

    def __init__(self, buffer_size: int, min_count: int):
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        if min_count < 0:
            raise ValueError(f"min_count must be >= 0, got {min_count}")
        self.buffer_size = int(buffer_size)
        self.min_count = int(min_count)
        self._buffers: dict[str, deque[np.ndarray]] = {}

    def update(self, prompts: list[str], values: np.ndarray) -> np.ndarray:
        """Add this batch's rows and return them normalised; same shape as ``values``, float32."""
        values = np.asarray(values, dtype=np.float64)
        if values.ndim not in (1, 2):
            raise ValueError(f"values must be [B] or [B, T], got shape {values.shape}")
        if len(prompts) != values.shape[0]:
            raise ValueError(f"got {len(prompts)} prompts for {values.shape[0]} rows of values")
        if len(prompts) == 0:
            return values.astype(np.float32)
        if not np.isfinite(values).all():
            bad_rows = np.flatnonzero(~np.isfinite(values.reshape(len(prompts), -1)).all(axis=1))
            raise ValueError(f"values hold non-finite entries in rows {bad_rows.tolist()}; drop them first")

        rows = values.reshape(len(prompts), -1)
        normalised = np.empty_like(rows)
        batch_mean, batch_std = rows.mean(), rows.std() + _STD_EPS
        prompts_array = np.asarray(prompts, dtype=object)
        for prompt in dict.fromkeys(prompts):  # unique, in first-seen order
            mask = prompts_array == prompt
            buffer = self._buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(row.copy() for row in rows[mask])
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                buffered = np.concatenate(list(buffer))
                mean, std = buffered.mean(), buffered.std() + _STD_EPS
            normalised[mask] = (rows[mask] - mean) / std
        return normalised.reshape(values.shape).astype(np.float32)

    def state_dict(self) -> dict:
        """JSON-serialisable state (plain lists of floats), so a resume needs no pickle."""
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "buffers": {prompt: [row.tolist() for row in buffer] for prompt, buffer in self._buffers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore buffers; this tracker's own buffer_size and min_count win (the config may change).

        A buffer longer than buffer_size keeps its most recent rows.
        """
        self._buffers = {
            prompt: deque((np.asarray(row, dtype=np.float64).reshape(-1) for row in rows), maxlen=self.buffer_size)
            for prompt, rows in state["buffers"].items()
        }

    def stats(self) -> dict:
        lengths = [len(buffer) for buffer in self._buffers.values()]
        return {
            "num_prompts": len(lengths),
            "mean_buffer_rows": float(np.mean(lengths)) if lengths else 0.0,
            "min_buffer_rows": min(lengths, default=0),
            "max_buffer_rows": max(lengths, default=0),
        }

    def clear(self) -> None:
        self._buffers.clear()


def group_normalise(prompts: list[str], values, *, use_std: bool = True) -> tuple[np.ndarray, dict]:
    """Each prompt's rows normalised within their group (every row of that prompt in this call); float32.

    A row is one value (final reward) or T values (step rewards of one trajectory); a group's mean
    and std are taken over all values of its rows. ``(v - mean) / (std + 1e-4)`` with the population
    std (ddof=0, as ``np.std``), or ``v - mean`` when ``use_std`` is False. A group of one row has no
    baseline to compare with and gets 0. No state is kept between calls.

    Also returns ``{"group_size_mean", "group_single_frac", "group_zero_std_frac"}``: the mean rows
    per group, the fraction of groups with one row, and of groups of >= 2 rows whose values are all
    equal (no learning signal from them).
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim not in (1, 2):
        raise ValueError(f"values must be [B] or [B, T], got shape {values.shape}")
    if len(prompts) != values.shape[0]:
        raise ValueError(f"got {len(prompts)} prompts for {values.shape[0]} rows of values")
    stats = {"group_size_mean": 0.0, "group_single_frac": 0.0, "group_zero_std_frac": 0.0}
    if len(prompts) == 0:
        return values.astype(np.float32), stats
    if not np.isfinite(values).all():
        bad_rows = np.flatnonzero(~np.isfinite(values.reshape(len(prompts), -1)).all(axis=1))
        raise ValueError(f"values hold non-finite entries in rows {bad_rows.tolist()}; drop them first")

    rows = values.reshape(len(prompts), -1)
    normalised = np.zeros_like(rows)
    prompts_array = np.asarray(prompts, dtype=object)
    sizes, zero_std = [], 0
    for prompt in dict.fromkeys(prompts):  # unique, in first-seen order
        mask = prompts_array == prompt
        group = rows[mask]
        sizes.append(len(group))
        if len(group) < 2:
            continue  # stays 0
        zero_std += int(np.ptp(group) == 0.0)
        centred = group - group.mean()
        normalised[mask] = centred / (group.std() + _GROUP_STD_EPS) if use_std else centred
    stats = {
        "group_size_mean": float(np.mean(sizes)),
        "group_single_frac": float(np.mean([size == 1 for size in sizes])),
        "group_zero_std_frac": zero_std / max(1, sum(size >= 2 for size in sizes)),
    }
    return normalised.reshape(values.shape).astype(np.float32), stats
