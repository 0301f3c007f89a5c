"""The sample-efficiency benchmark's three plots, drawn from its summary (`efficiency_summary.summarise`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dense_rl.bench.common import pyplot

COLOURS = {"ddpo": "tab:gray", "uca": "tab:blue", "coca": "tab:red", "reward_gain": "tab:green"}
LABELS = {"ddpo": "DDPO", "uca": "UCA", "coca": "CoCA", "reward_gain": "reward gain"}


def plot_curves(summary: dict, path: Path) -> None:
    """Reward vs samples, one panel per reward: the mean over seeds (thin), its smoothed curve (thick)
    and the 95 % bootstrap band of the mean; DDPO's final reward dotted."""
    plt = pyplot()
    rewards = summary["rewards"]
    columns = max(1, len(rewards))
    figure, axes = plt.subplots(1, columns, figsize=(5.5 * columns, 4.2), dpi=110, squeeze=False)
    x = np.array(summary["samples"])
    for axis, (reward, sweep) in zip(axes[0], rewards.items()):
        for method, entry in sweep["methods"].items():
            colour = COLOURS[method]
            axis.plot(x, entry["curve_mean"], marker="o", markersize=3, color=colour, alpha=0.5, linewidth=1)
            axis.plot(x, entry["curve_smoothed"], color=colour, linewidth=2, label=f"{LABELS[method]} ({entry['seeds']} seeds)")
            axis.fill_between(x, entry["curve_ci_low"], entry["curve_ci_high"], color=colour, alpha=0.15)
        if sweep.get("ddpo_final_reward") is not None:
            axis.axhline(sweep["ddpo_final_reward"], color="k", linestyle=":", linewidth=1, label="DDPO final")
        axis.set_xlabel("samples trained on before this epoch's policy")
        axis.set_ylabel(f"training reward ({reward}), epoch mean")
        axis.set_title(f"{reward}: mean over seeds, band = 95 % CI;\nthick: {summary['smoothing_window_epochs']}-epoch trailing mean",
                       fontsize=9)
        axis.grid(alpha=0.3)
        axis.legend(loc="best", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_heldout(summary: dict, base: dict, path: Path) -> None:
    """Held-out rewards of the final policies, per reward sweep: the trained reward (top row) and the
    unseen one (bottom row), with 95 % bootstrap intervals, beside the base model."""
    plt = pyplot()
    rewards = summary["rewards"]
    columns = max(1, len(rewards))
    figure, axes = plt.subplots(2, columns, figsize=(4.5 * columns, 6.5), dpi=110, squeeze=False)
    for column, (reward, sweep) in enumerate(rewards.items()):
        for row, name in enumerate((reward, sweep["unseen_reward"])):
            axis = axes[row][column]
            scores = {m: entry["heldout"][name] for m, entry in sweep["methods"].items() if name in entry["heldout"]}
            # The base model is one number, without an interval.
            labels = ["base"] + [LABELS[m] for m in scores]
            means = [base.get(name, np.nan)] + [s["mean"] for s in scores.values()]
            lows = [0.0] + [s["mean"] - s["ci_low"] for s in scores.values()]
            highs = [0.0] + [s["ci_high"] - s["mean"] for s in scores.values()]
            axis.bar(labels, means, yerr=[lows, highs], color=["white"] + [COLOURS[m] for m in scores], edgecolor="k")
            if any(np.isfinite(v) for v in means):
                low = min(m - e for m, e in zip(means, lows) if np.isfinite(m))
                high = max(m + e for m, e in zip(means, highs) if np.isfinite(m))
                axis.set_ylim(low - 0.5 * (high - low + 1e-3), high + 0.3 * (high - low + 1e-3))  # differences are small
            role = "trained reward" if row == 0 else "unseen reward"
            axis.set_title(f"trained on {reward}: held-out {name}\n({role}; 95 % CI over seeds)", fontsize=9)
            axis.tick_params(axis="x", labelsize=8)
            axis.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_credit(summary: dict, path: Path) -> bool:
    """Per reward, the step weights over the denoising steps (mean, band = mean within-epoch std) and
    the mean cosine to the final sample, per method. Writes nothing and returns False when no run
    recorded a credit profile."""
    rewards = {r: sweep for r, sweep in summary["rewards"].items()
               if any(entry.get("credit_profile") for entry in sweep["methods"].values())}
    if not rewards:
        return False
    plt = pyplot()
    figure, axes = plt.subplots(len(rewards), 2, figsize=(11, 3.6 * len(rewards)), dpi=110, squeeze=False)
    for (weights_axis, cosine_axis), (reward, sweep) in zip(axes, rewards.items()):
        steps = None
        for method, entry in sweep["methods"].items():
            profile = entry.get("credit_profile") or {}
            colour, label = COLOURS[method], LABELS[method]
            if "step_weight_mean_per_step" in profile:
                mean = np.array(profile["step_weight_mean_per_step"])
                steps = np.arange(len(mean))
                spread = np.array(profile.get("step_weight_std_per_step", np.zeros_like(mean)))
                weights_axis.plot(steps, mean, color=colour, linewidth=2, label=label)
                weights_axis.fill_between(steps, mean - spread, mean + spread, color=colour, alpha=0.15)
            if "cosine_mean_per_step" in profile:
                cosine = np.array(profile["cosine_mean_per_step"])
                cosine_axis.plot(np.arange(len(cosine)), cosine, color=colour, linewidth=2, label=label)
        if steps is not None:
            weights_axis.axhline(1 / len(steps), color="k", linestyle=":", linewidth=1, label="uniform 1/T")
        weights_axis.set_title(f"{reward}: step weight per denoising step\n(mean over epochs and seeds; band = within-batch std)",
                               fontsize=9)
        weights_axis.set_xlabel("denoising step (0 = noisiest)")
        cosine_axis.set_title(f"{reward}: cosine(predicted clean sample, final sample)\nmean over samples, epochs and seeds",
                              fontsize=9)
        cosine_axis.set_xlabel("denoising step (0 = noisiest)")
        for axis in (weights_axis, cosine_axis):
            axis.grid(alpha=0.3)
            if axis.get_legend_handles_labels()[0]:
                axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True


def plot_samples(out: Path, runs_dir: Path, grid: list[tuple], path: Path) -> bool:
    """Held-out samples of the final policies, a row per training reward: the base model, then each
    method at the lowest seed whose samples are on disk (the same prompts and noise in every panel).
    Writes nothing and returns False when no run saved its samples."""
    from PIL import Image

    from dense_rl.bench.efficiency_runs import samples_file

    rewards = list(dict.fromkeys(reward for reward, _, _ in grid))
    methods = list(dict.fromkeys(method for _, method, _ in grid))
    panels = {}
    for reward, method, seed in sorted(grid, key=lambda key: key[2]):
        file = samples_file(runs_dir, (reward, method, seed))
        if (reward, method) not in panels and file.is_file():
            panels[reward, method] = (seed, file)
    if not panels:
        return False
    plt = pyplot()
    columns = 1 + len(methods)
    width, height = Image.open(next(iter(panels.values()))[1]).size
    figure, axes = plt.subplots(len(rewards), columns, figsize=(2.3 * columns, 2.3 * height / width * len(rewards) + 0.8),
                                dpi=110, squeeze=False)
    base = out / "base_heldout.png"
    for row, reward in zip(axes, rewards):
        for axis, (label, entry) in zip(row, [("base model", (None, base))] +
                                        [(LABELS[m], panels.get((reward, m))) for m in methods]):
            axis.set_xticks([])
            axis.set_yticks([])
            if entry is None or not entry[1].is_file():
                axis.text(0.5, 0.5, "not run yet", ha="center", va="center", transform=axis.transAxes)
            else:
                axis.imshow(np.asarray(Image.open(entry[1])))
            seed = "" if entry is None or entry[0] is None else f", seed {entry[0]}"
            axis.set_title(f"{label}{seed}", fontsize=9)
        row[0].set_ylabel(f"trained on {reward}", fontsize=9)
    figure.suptitle("held-out prompts (a row per digit, a column per colour) after the budget", fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True
