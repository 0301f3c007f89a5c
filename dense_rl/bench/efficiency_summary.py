"""From the run records of the sample-efficiency grid to the summary in results.json: per training
reward and method, the curves, crossings, ratios, gains, AUC, held-out rewards and credit profile.
No I/O; the statistics themselves are in `efficiency_stats`."""

from __future__ import annotations

import numpy as np

from dense_rl.bench import efficiency_stats as stats
from dense_rl.bench.efficiency_runs import METHODS, PROFILE, key_of


def grid_status(grid: list[tuple], present) -> dict:
    """Whether every run of `grid` is among `present` (keys (reward, method, seed)), and which are not."""
    present = set(present)
    missing = [key for key in grid if key not in present]
    return {"complete": not missing, "expected_runs": len(grid), "present_runs": len(grid) - len(missing),
            "missing": [{"reward": r, "method": m, "seed": s} for r, m, s in missing],
            "extra_runs_ignored": len(present - set(grid))}


def credit_profile(runs: list[dict]) -> dict | None:
    """Per denoising step, over every epoch and seed of one method: the mean step weight, the
    typical spread of the weights within an epoch's batch (mean of the per-epoch std), the spread of
    the per-epoch mean across epochs and seeds, and the mean cosine to the final sample. None when
    the runs recorded none of it."""
    out = {}
    for name in PROFILE:
        rows = [row for run in runs for row in (run.get(name) or []) if row is not None]
        if rows and len({len(row) for row in rows}) == 1:
            rows = np.array(rows, dtype=float)
            out[name] = rows.mean(axis=0).tolist()
            if name == "step_weight_mean_per_step":
                out["step_weight_mean_spread_per_step"] = rows.std(axis=0).tolist()
    return out or None


def summarise_reward(runs: list[dict], reward: str, methods: list[str], samples: np.ndarray, window: int,
                     unseen: str, num_resamples: int = stats.NUM_RESAMPLES) -> dict:
    """One reward's sweep: per method its curves, crossings, ratio, gain, AUC and held-out rewards,
    over the seeds every method finished (so that every comparison is paired)."""
    run_of = {(r["method"], int(r["seed"])): r for r in runs if r["reward"] == reward}
    methods = [m for m in methods if any(method == m for method, _ in run_of)]
    seeds_of = [{s for (m, s) in run_of if m == method} for method in methods]
    seeds = sorted(set.intersection(*seeds_of)) if seeds_of else []
    out = {"trained_reward": reward, "unseen_reward": unseen, "seeds_paired": seeds,
           "unpaired_runs_left_out": len(run_of) - len(seeds) * len(methods), "methods": {}}
    if not seeds:
        return out
    indices = stats.resample_indices(len(seeds), num_resamples, stats.BOOTSTRAP_SEED)  # the same for every method
    curves = {m: np.array([run_of[m, s]["reward_mean"] for s in seeds], dtype=float) for m in methods}
    smoothed = {m: stats.smooth(c.mean(axis=0), window) for m, c in curves.items()}
    ddpo = curves.get("ddpo")
    if ddpo is not None:
        start, final = float(smoothed["ddpo"][0]), float(smoothed["ddpo"][-1])
        targets = {f"{f:g}": final - (1 - f) * (final - start) for f in stats.FRACTIONS}
        out.update(ddpo_first_reward=start, ddpo_final_reward=final, targets=targets)
    for method in methods:
        curve = curves[method]
        done = [run_of[method, s] for s in seeds]
        low, high = stats.curve_band(curve, indices)
        entry = {
            "seeds": len(seeds), "curve_mean": curve.mean(axis=0).tolist(), "curve_std": curve.std(axis=0).tolist(),
            "curve_ci_low": low, "curve_ci_high": high, "curve_smoothed": smoothed[method].tolist(),
            "first_reward_mean": float(curve[:, 0].mean()),
            "final_reward_mean": float(smoothed[method][-1]),
            "final_reward": stats.mean_interval(stats.smooth(curve, window)[:, -1], indices),
            "auc": stats.auc_summary(samples, curve, None if ddpo is None or method == "ddpo" else ddpo, indices),
            "heldout": {name: stats.mean_interval([r["heldout"][name] for r in done], indices)
                        for name in (reward, unseen) if all(name in r["heldout"] for r in done)},
            # Medians: a run that shared the cores for a while (or was paused) skews a mean.
            "median_epoch_seconds": float(np.median([np.median(r["epoch_seconds"]) for r in done])),
            "median_score_seconds": (float(np.median([np.median(r["seconds_score"]) for r in done]))
                                   if all(r.get("seconds_score") for r in done) else None),
        }
        if ddpo is not None:
            # Counted from 0 samples (the base model, the same for every method) on.
            entry["samples_to_reach"] = {f: stats.samples_to_reach(samples, smoothed[method], t)
                                         for f, t in out["targets"].items()}
        if ddpo is not None and method != "ddpo":
            entry["ratio_vs_ddpo"] = stats.crossing_ratio(samples, ddpo, curve, window=window, indices=indices)
            entry["paired_gain_over_ddpo"] = stats.paired_gain(ddpo, curve, indices)
            ddpo_heldout = [run_of["ddpo", s]["heldout"] for s in seeds]
            entry["heldout_gain_over_ddpo"] = {
                name: stats.mean_interval(np.array([r["heldout"][name] for r in done])
                                          - [b[name] for b in ddpo_heldout], indices)
                for name in entry["heldout"] if all(name in b for b in ddpo_heldout)}
        profile = credit_profile(done)
        if profile:
            entry["credit_profile"] = profile
        out["methods"][method] = entry
    return out


def summarise(runs: list[dict], grid: list[tuple], settings: dict, num_resamples: int = stats.NUM_RESAMPLES) -> dict:
    """The summary of every reward's sweep, and whether the grid is complete; runs outside `grid`
    are left out."""
    samples = np.arange(settings["epochs"]) * settings["samples_per_epoch"]
    window = stats.smoothing_window(settings["epochs"])
    rewards = list(dict.fromkeys(key[0] for key in grid))
    methods = [m for m in METHODS if any(key[1] == m for key in grid)]
    wanted = set(grid)
    in_grid = [run for run in runs if key_of(run) in wanted]
    return {
        "grid": grid_status(grid, {key_of(run) for run in runs}),
        "samples": samples.tolist(), "smoothing_window_epochs": window, "thresholds": list(stats.FRACTIONS),
        "interval": stats.LEVEL, "num_resamples": num_resamples, "bootstrap_seed": stats.BOOTSTRAP_SEED,
        "rewards": {reward: summarise_reward(in_grid, reward, methods, samples, window, settings["unseen_reward"],
                                             num_resamples) for reward in rewards},
    }
