"""The sample-efficiency benchmark's statistics: pure numpy, no torch, no I/O.

Every function works on reward curves laid out as ``[seeds, epochs]`` arrays, one row per seed, rows
of different methods *paired by seed* (row i of every method is the same seed: the same prompts and
noise seeds every epoch, the same first batch). ``samples[e]`` is the number of samples trained on
before epoch e's policy sampled, so ``samples[0] == 0`` is the base model.

Uncertainty is a percentile bootstrap over seeds: resample the seeds with replacement
(``resample_indices``), recompute the statistic from the resampled seeds, and take the 2.5th and
97.5th percentiles of the recomputed values. Paired comparisons use the *same* resampled seeds for
both methods, so what a seed's prompts allow cancels. The resamples come from a fixed
``numpy.random.Generator`` seed, so the same runs always give the same intervals.
"""

from __future__ import annotations

import numpy as np

NUM_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
LEVEL = 0.95
# Fractions of the way from the first-epoch reward to DDPO's final reward at which the samples each
# method needs are compared; 1.0 is DDPO's final reward itself (the paper's comparison).
FRACTIONS = (0.5, 0.75, 1.0)


def samples_to_reach(samples: np.ndarray, curve: np.ndarray, target: float) -> float | None:
    """The first sample count at which `curve` reaches `target`, interpolating linearly between
    epochs; None if it never does within the budget.

    A curve already at or above the target at its first point reaches it at ``samples[0]``.
    Example: ``samples_to_reach([0, 10, 20], [0.0, 0.4, 0.8], 0.6) == 15.0``."""
    samples, curve = np.asarray(samples, dtype=float), np.asarray(curve, dtype=float)
    for i, value in enumerate(curve):
        if value >= target:
            if i == 0:
                return float(samples[0])
            x0, x1, y0, y1 = samples[i - 1], samples[i], curve[i - 1], curve[i]
            return float(x0 + (target - y0) / (y1 - y0) * (x1 - x0))
    return None


def first_crossings(samples: np.ndarray, curves: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """`samples_to_reach` for many curves at once: ``curves`` is ``[n, epochs]``, ``targets`` is
    ``[n]`` (one target per curve); returns ``[n]`` sample counts, NaN where a curve never reaches
    its target."""
    samples = np.asarray(samples, dtype=float)
    curves = np.atleast_2d(np.asarray(curves, dtype=float))
    targets = np.broadcast_to(np.asarray(targets, dtype=float), curves.shape[:1])
    above = curves >= targets[:, None]
    reached = above.any(axis=1)
    i = np.argmax(above, axis=1)  # first epoch at or above the target (0 where never: masked below)
    prev = np.maximum(i - 1, 0)
    rows = np.arange(len(curves))
    y0, y1 = curves[rows, prev], curves[rows, i]
    x0, x1 = samples[prev], samples[i]
    with np.errstate(divide="ignore", invalid="ignore"):
        interpolated = x0 + (targets - y0) / (y1 - y0) * (x1 - x0)
    out = np.where(i == 0, samples[0], interpolated)
    return np.where(reached, out, np.nan)


def smooth(curve: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` epochs along the last axis (a curve ``[epochs]`` or a stack of
    curves ``[n, epochs]``): each epoch draws other prompts, and prompts differ in how much reward
    they allow, so single epochs jump; every method sees the same prompts each epoch. The first
    ``window - 1`` points average what there is (point 0 stays the first epoch's reward)."""
    curve = np.asarray(curve, dtype=float)
    window = max(1, int(window))
    cumulative = np.cumsum(curve, axis=-1)
    shifted = np.concatenate([np.zeros_like(cumulative[..., :window]), cumulative[..., :-window]], axis=-1)
    shifted = shifted[..., : curve.shape[-1]]
    counts = np.minimum(np.arange(1, curve.shape[-1] + 1), window)
    return (cumulative - shifted) / counts


def smoothing_window(num_epochs: int) -> int:
    """Epochs in the trailing mean: a quarter of the run, at least 1."""
    return max(1, num_epochs // 4)


def resample_indices(num_seeds: int, num_resamples: int = NUM_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """``[num_resamples, num_seeds]`` seed indices drawn with replacement from a fixed Generator:
    row r is the r-th bootstrap resample. Exactly
    ``np.random.default_rng(seed).integers(0, num_seeds, size=(num_resamples, num_seeds))``."""
    if num_seeds < 1:
        raise ValueError(f"a bootstrap needs at least one seed, got {num_seeds}")
    return np.random.default_rng(seed).integers(0, num_seeds, size=(num_resamples, num_seeds))


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float] | tuple[None, None]:
    """The central `level` percentile interval of bootstrap values (numpy's linear interpolation
    between order statistics); (None, None) when there are none. NaNs are left out."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return None, None
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def _indices(num_seeds: int, indices: np.ndarray | None) -> np.ndarray:
    return resample_indices(num_seeds) if indices is None else np.asarray(indices)


def mean_interval(values: np.ndarray, indices: np.ndarray | None = None, level: float = LEVEL) -> dict:
    """Mean over seeds of one number per seed, with its bootstrap interval and the std over seeds.
    ``indices``: the resamples (``resample_indices``); pass the same ones to every call that must
    be paired. When every seed gives the same value the interval is that value."""
    values = np.asarray(values, dtype=float)
    means = values[_indices(len(values), indices)].mean(axis=1)
    low, high = percentile_interval(means, level)
    return {"mean": float(values.mean()), "ci_low": low, "ci_high": high, "std": float(values.std()),
            "seeds": int(len(values))}


def curve_band(curves: np.ndarray, indices: np.ndarray | None = None, level: float = LEVEL) -> tuple[list, list]:
    """Per epoch, the bootstrap interval of the mean curve over seeds: (low, high), each ``[epochs]``."""
    curves = np.asarray(curves, dtype=float)
    means = curves[_indices(len(curves), indices)].mean(axis=1)  # [resamples, epochs]
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail], axis=0)
    return low.tolist(), high.tolist()


def crossing_ratio(samples: np.ndarray, ddpo: np.ndarray, method: np.ndarray, *, fractions=FRACTIONS,
                   window: int | None = None, indices: np.ndarray | None = None, level: float = LEVEL) -> dict:
    """How many times fewer samples `method` needs than DDPO to reach DDPO's reward, with a paired
    percentile bootstrap over seeds.

    From the seeds' mean curves, each smoothed over `window` epochs (default `smoothing_window`):
    DDPO's final reward F is the last point of its smoothed curve and its first-epoch reward S the
    first point; the target at fraction f is ``F - (1 - f) * (F - S)`` (= ``S + f * (F - S)``) (f = 1: DDPO's final reward). Each
    curve's crossing is `samples_to_reach` on its smoothed curve, from 0 samples on; the ratio is
    DDPO's crossing / the method's. DDPO reaches its own final reward by the end of the budget.

    Per resample (the same resampled seeds for both methods, mean curves, smoothing, targets and
    crossings recomputed):
    - the method never reaches the target: ratio 0 (it would need infinitely many samples), and it
      is counted in ``fraction_never``;
    - DDPO did not improve on its first epoch (F <= S, no threshold to reach), or a curve is at the
      target before any update (possible only when the methods' first epochs differ): no ratio, the
      resample is left out of the interval and counted in ``fraction_undefined``.

    Returns ``{str(f): {"value", "ci_low", "ci_high", "ddpo_samples", "method_samples", "target",
    "fraction_never", "fraction_undefined", "resamples"}}``; ``value`` is the point estimate from
    all seeds (0 when the method never reaches the target, None when undefined)."""
    samples = np.asarray(samples, dtype=float)
    ddpo, method = np.atleast_2d(np.asarray(ddpo, dtype=float)), np.atleast_2d(np.asarray(method, dtype=float))
    if ddpo.shape != method.shape:
        raise ValueError(f"paired curves must have the same [seeds, epochs] shape, got {ddpo.shape} and {method.shape}")
    window = smoothing_window(ddpo.shape[1]) if window is None else window
    idx = _indices(len(ddpo), indices)
    # Row 0: all seeds (the point estimate); rows 1..: the bootstrap resamples.
    smooth_d = smooth(np.concatenate([ddpo.mean(0, keepdims=True), ddpo[idx].mean(axis=1)]), window)
    smooth_m = smooth(np.concatenate([method.mean(0, keepdims=True), method[idx].mean(axis=1)]), window)
    start, final = smooth_d[:, 0], smooth_d[:, -1]
    result = {}
    for f in fractions:
        targets = final - (1 - f) * (final - start)  # exactly `final` at f = 1: DDPO reaches it
        cross_d = first_crossings(samples, smooth_d, targets)
        cross_m = first_crossings(samples, smooth_m, targets)
        undefined = (final <= start) | (cross_d <= samples[0]) | (cross_m <= samples[0])
        never = ~undefined & np.isnan(cross_m)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(never, 0.0, cross_d / cross_m)
        ratio = np.where(undefined, np.nan, ratio)
        low, high = percentile_interval(ratio[1:], level)
        boot_undefined, boot_never = undefined[1:], never[1:]
        result[f"{f:g}"] = {
            "value": None if undefined[0] else float(ratio[0]),
            "ci_low": low, "ci_high": high,
            "target": float(targets[0]),
            "ddpo_samples": None if np.isnan(cross_d[0]) else float(cross_d[0]),
            "method_samples": None if np.isnan(cross_m[0]) else float(cross_m[0]),
            "fraction_never": float(boot_never.mean()),
            "fraction_undefined": float(boot_undefined.mean()),
            "resamples": int(len(idx)),
        }
    return result


def guarded_crossings(samples: np.ndarray, trained: np.ndarray, unseen: np.ndarray, targets: np.ndarray,
                      floor: float) -> np.ndarray:
    """The first sample count at which a held-out `trained` curve reaches its target at a point whose
    `unseen` reward is at least `floor` (a guarded point): curves ``[n, points]``, ``targets`` ``[n]``;
    NaN where no guarded point reaches it. Between a guarded point below the target and the next one
    the count is interpolated linearly; after a point that is not guarded it is the point's own count.
    Example: samples [0, 10, 20], trained [0.0, 0.4, 0.8], unseen [1, 1, 1], target 0.6, floor 0.9 -> 15;
    with unseen [1, 0, 1] -> 20 (the point at 10 is not guarded); with unseen [1, 1, 0] -> never."""
    samples = np.asarray(samples, dtype=float)
    trained, unseen = np.atleast_2d(np.asarray(trained, dtype=float)), np.atleast_2d(np.asarray(unseen, dtype=float))
    targets = np.broadcast_to(np.asarray(targets, dtype=float), trained.shape[:1])
    guarded = unseen >= floor
    hit = guarded & (trained >= targets[:, None])
    i = np.argmax(hit, axis=1)
    prev, rows = np.maximum(i - 1, 0), np.arange(len(trained))
    y0, y1 = trained[rows, prev], trained[rows, i]
    with np.errstate(divide="ignore", invalid="ignore"):
        interpolated = samples[prev] + (targets - y0) / (y1 - y0) * (samples[i] - samples[prev])
    out = np.where((i > 0) & guarded[rows, prev] & (y0 < targets), interpolated, samples[i])
    return np.where(hit.any(axis=1), out, np.nan)


def guarded_ratio(samples: np.ndarray, baseline_trained: np.ndarray, baseline_unseen: np.ndarray,
                  method_trained: np.ndarray, method_unseen: np.ndarray, floor: float,
                  indices: np.ndarray | None = None, level: float = LEVEL) -> dict:
    """How many times fewer samples `method` needs than the baseline to reach the baseline's final
    held-out trained reward at a guarded point (`guarded_crossings`: unseen reward >= `floor`), from
    the seeds' mean held-out curves ``[seeds, evaluations]`` (``samples``: samples trained on before
    each evaluation, 0 first: the base model), paired by seed, with a percentile bootstrap over seeds.

    Per resample: the target is the baseline's final mean trained reward; the method never reaches it
    guarded: ratio 0 (``fraction_never``); the baseline never does (its own final point, or every point
    up to it, is past the guard): no ratio (``fraction_undefined``; ``baseline_samples`` None), while
    ``method_samples`` still says whether the method gets there guarded."""
    samples = np.asarray(samples, dtype=float)
    curves = [np.atleast_2d(np.asarray(c, dtype=float)) for c in
              (baseline_trained, baseline_unseen, method_trained, method_unseen)]
    if len({c.shape for c in curves}) != 1:
        raise ValueError(f"paired held-out curves must have one [seeds, evaluations] shape, got {[c.shape for c in curves]}")
    idx = _indices(len(curves[0]), indices)
    bt, bu, mt, mu = (np.concatenate([c.mean(0, keepdims=True), c[idx].mean(axis=1)]) for c in curves)
    targets = bt[:, -1]
    cross_b = guarded_crossings(samples, bt, bu, targets, floor)
    cross_m = guarded_crossings(samples, mt, mu, targets, floor)
    undefined = np.isnan(cross_b) | (cross_b <= samples[0])
    never = ~undefined & np.isnan(cross_m)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(never, 0.0, cross_b / cross_m)
    ratio = np.where(undefined, np.nan, ratio)
    low, high = percentile_interval(ratio[1:], level)
    return {"value": None if undefined[0] else float(ratio[0]), "ci_low": low, "ci_high": high,
            "target": float(targets[0]), "floor": float(floor),
            "baseline_samples": None if np.isnan(cross_b[0]) else float(cross_b[0]),
            "method_samples": None if np.isnan(cross_m[0]) else float(cross_m[0]),
            "fraction_never": float(never[1:].mean()), "fraction_undefined": float(undefined[1:].mean()),
            "resamples": int(len(idx))}


def paired_gain(ddpo: np.ndarray, method: np.ndarray, indices: np.ndarray | None = None, level: float = LEVEL) -> dict | None:
    """The method's reward minus DDPO's, paired by (seed, epoch) -- the same prompts and noise
    seeds, so prompt difficulty cancels -- from the first update on (epoch 0 is the same base model
    for both). ``mean``: over seeds and epochs 1..; ``per_epoch_*``: the mean over seeds at each
    epoch 0..; intervals: the paired bootstrap over seeds. None with a single epoch."""
    ddpo, method = np.atleast_2d(np.asarray(ddpo, dtype=float)), np.atleast_2d(np.asarray(method, dtype=float))
    if ddpo.shape[1] < 2:
        return None
    gain = method - ddpo  # [seeds, epochs]
    idx = _indices(len(gain), indices)
    resampled = gain[idx]  # [resamples, seeds, epochs]
    low, high = percentile_interval(resampled[:, :, 1:].mean(axis=(1, 2)), level)
    tail = 100 * (1 - level) / 2
    epoch_low, epoch_high = np.percentile(resampled.mean(axis=1), [tail, 100 - tail], axis=0)
    return {"mean": float(gain[:, 1:].mean()), "ci_low": low, "ci_high": high,
            "per_epoch_mean": gain.mean(axis=0).tolist(), "per_epoch_ci_low": epoch_low.tolist(),
            "per_epoch_ci_high": epoch_high.tolist(), "seeds": int(len(gain)), "epochs_from": 1}


def auc(samples: np.ndarray, curve: np.ndarray) -> np.ndarray | float:
    """Area under the reward-vs-samples curve (trapezoid rule) divided by the span of samples it
    covers, i.e. the run's average reward: a constant curve c gives c, a straight line from a to b
    gives (a + b) / 2. The span is the budget less the last epoch's samples (the last point is the
    policy after ``samples[-1]`` samples). ``curve``: ``[epochs]`` or ``[n, epochs]`` (one per row)."""
    samples, curve = np.asarray(samples, dtype=float), np.asarray(curve, dtype=float)
    if len(samples) < 2:
        return curve[..., 0] if curve.ndim > 1 else float(curve[0])
    area = ((curve[..., 1:] + curve[..., :-1]) / 2 * np.diff(samples)).sum(axis=-1)
    value = area / (samples[-1] - samples[0])
    return float(value) if np.ndim(value) == 0 else value


def auc_summary(samples: np.ndarray, curves: np.ndarray, ddpo: np.ndarray | None = None,
                indices: np.ndarray | None = None, level: float = LEVEL) -> dict:
    """`auc` per seed, its mean and bootstrap interval; with `ddpo` (paired curves) also the paired
    difference method - DDPO (``gain_over_ddpo``) on the same resamples."""
    per_seed = auc(samples, np.atleast_2d(curves))
    out = mean_interval(per_seed, indices, level)
    if ddpo is not None:
        out["gain_over_ddpo"] = mean_interval(per_seed - auc(samples, np.atleast_2d(ddpo)), indices, level)
    return out
