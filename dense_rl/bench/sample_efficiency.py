"""CoCA vs DDPO (sparse credit) vs UCA (uniform credit) at a fixed sample budget.

Every run uses the in-process reference loop (`dense_rl.loop.train`, the same algorithm the Ray system
runs) with identical settings and seeds; only `credit.mode` differs. So for a given seed the three
methods sample the very same first batch, and differ afterwards only through what they learned.

Reports, per method: reward-vs-samples curves (mean and spread across seeds), the number of samples
needed to reach DDPO's final mean reward and the ratio DDPO / CoCA (the paper reports 1.25-2x), and
the final policy's reward on held-out prompts, by the training reward and by an unseen one.

    python -m dense_rl.bench sample-efficiency                   # 3 seeds x 3 methods, 256 samples each
    python -m dense_rl.bench sample-efficiency --quick           # a small version for CI
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from dense_rl.bench.common import Report, load_average, pyplot, table

METHODS = {"ddpo": "sparse", "uca": "uniform", "coca": "coca"}  # the paper's names -> credit.mode
COLOURS = {"ddpo": "tab:gray", "uca": "tab:blue", "coca": "tab:red"}
EVAL_SEED = 1234
QUICK = ["sample.num_steps=10", "sample.batch_size=8", "sample.num_batches_per_epoch=1", "train.batch_size=8"]


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m dense_rl.bench sample-efficiency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench/sample-efficiency")
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per method (0, 1, ...)")
    parser.add_argument("--budget", type=int, default=256, help="samples per run (rounded up to whole epochs)")
    parser.add_argument("--heldout", default="embedded:tiny_heldout", help="prompts for the final evaluation")
    parser.add_argument("--unseen-reward", default="digit_alignment", help="a reward the runs do not train on")
    parser.add_argument("--quick", action="store_true", help="2 seeds, 2 epochs of 8 samples, 10 steps: for CI")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on shared cores, more threads mostly wait for each other)")
    parser.add_argument("--seed-list", help="comma-separated seeds to run (instead of 0..--seeds-1), e.g. to run seeds in parallel")
    parser.add_argument("--merge", nargs="+", metavar="DIR", help="combine the results.json of these --out folders into --out")
    return parser.parse_args(argv)


def samples_to_reach(samples: np.ndarray, curve: np.ndarray, target: float) -> float | None:
    """The first sample count at which `curve` reaches `target`, interpolating linearly between
    epochs; None if it never does within the budget."""
    for i, value in enumerate(curve):
        if value >= target:
            if i == 0:
                return float(samples[0])
            x0, x1, y0, y1 = samples[i - 1], samples[i], curve[i - 1], curve[i]
            return float(x0 + (target - y0) / (y1 - y0) * (x1 - x0))
    return None


def smooth(curve: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` epochs: each epoch draws other prompts, and prompts differ in how
    much reward they allow, so single epochs jump; all methods see the same prompts each epoch."""
    return np.array([curve[max(0, i - window + 1): i + 1].mean() for i in range(len(curve))])


def summarise(runs: list[dict], samples: np.ndarray) -> dict:
    curves = {m: np.array([r["reward_mean"] for r in runs if r["method"] == m and r["seed"] in seeds_of_all(runs)])
              for m in METHODS}
    curves = {m: c for m, c in curves.items() if len(c)}
    window = max(1, len(samples) // 4)
    summary = {"samples": samples.tolist(), "smoothing_window_epochs": window, "methods": {}}
    smoothed = {m: smooth(c.mean(axis=0), window) for m, c in curves.items()}
    # DDPO's smoothed curve's own last point, so DDPO reaches it at the budget at the latest.
    target = float(smoothed["ddpo"][-1]) if "ddpo" in curves else None
    summary["ddpo_final_mean_reward"] = target
    for method, curve in curves.items():
        mean = curve.mean(axis=0)
        done = [r for r in runs if r["method"] == method]
        reach = None if target is None else samples_to_reach(samples[1:], smoothed[method][1:], target)
        summary["methods"][method] = {
            "seeds": len(curve),
            "curve_mean": mean.tolist(), "curve_std": curve.std(axis=0).tolist(),
            "curve_min": curve.min(axis=0).tolist(), "curve_max": curve.max(axis=0).tolist(),
            "curve_smoothed": smoothed[method].tolist(),
            "first_reward_mean": float(curve[:, 0].mean()),
            "final_reward_mean": float(smoothed[method][-1]),
            "final_reward_std": float(np.std([smooth(c, window)[-1] for c in curve])),
            # Counted from the first update on: at 0 samples every method is the same base model.
            "samples_to_reach_ddpo_final": reach,
            "heldout": {name: {"mean": float(np.mean([r["heldout"][name] for r in done])),
                               "std": float(np.std([r["heldout"][name] for r in done]))}
                        for name in done[0]["heldout"]},
            "mean_epoch_seconds": float(np.mean([np.mean(r["epoch_seconds"]) for r in done])),
        }
        if method != "ddpo" and "ddpo" in curves:
            # Paired by (seed, epoch): same prompts and noise seeds, so prompt difficulty cancels.
            gain = (curve - curves["ddpo"])[:, 1:]
            summary["methods"][method]["paired_gain_over_ddpo"] = {
                "mean": float(gain.mean()), "stderr": float(gain.std(ddof=1) / np.sqrt(gain.size)) if gain.size > 1 else None,
                "epochs_x_seeds": int(gain.size)}
    reach = {m: s["samples_to_reach_ddpo_final"] for m, s in summary["methods"].items()}
    for method in ("coca", "uca"):
        if reach.get("ddpo") and reach.get(method):
            summary[f"ratio_ddpo_over_{method}"] = reach["ddpo"] / reach[method]
        else:
            summary[f"ratio_ddpo_over_{method}"] = None
    return summary


def seeds_of_all(runs: list[dict]) -> set[int]:
    """Seeds every method finished (a run cut short must not bias one method's mean)."""
    by_method = [{r["seed"] for r in runs if r["method"] == m} for m in METHODS]
    by_method = [s for s in by_method if s]
    return set.intersection(*by_method) if by_method else set()


def plot(summary: dict, base: dict, unseen: str, path) -> None:
    plt = pyplot()
    figure, (left, *bars) = plt.subplots(1, 1 + len(base), figsize=(13, 4), dpi=110,
                                         gridspec_kw={"width_ratios": [3] + [1.2] * len(base)})
    x = np.array(summary["samples"])
    for method, s in summary["methods"].items():
        mean = np.array(s["curve_mean"])
        left.plot(x, mean, marker="o", markersize=3, color=COLOURS[method], alpha=0.5, linewidth=1)
        left.plot(x, s["curve_smoothed"], color=COLOURS[method], linewidth=2,
                  label=f"{method.upper()} ({s['seeds']} seeds; thick: {summary['smoothing_window_epochs']}-epoch mean)")
        left.fill_between(x, s["curve_min"], s["curve_max"], color=COLOURS[method], alpha=0.15)
    if summary["ddpo_final_mean_reward"] is not None:
        left.axhline(summary["ddpo_final_mean_reward"], color="k", linestyle=":", linewidth=1, label="DDPO final mean")
    left.set_xlabel("samples trained on before this epoch's policy")
    left.set_ylabel("training reward (preference), epoch mean")
    left.set_title("reward vs samples: mean across seeds, band = min..max")
    left.grid(alpha=0.3)
    left.legend(loc="lower right", fontsize=8)

    methods = list(summary["methods"])
    for axis, name in zip(bars, base):
        labels = ["base"] + [m.upper() for m in methods]
        means = [base[name]] + [summary["methods"][m]["heldout"][name]["mean"] for m in methods]
        stds = [0.0] + [summary["methods"][m]["heldout"][name]["std"] for m in methods]
        axis.bar(labels, means, yerr=stds, color=["white"] + [COLOURS[m] for m in methods], edgecolor="k")
        low, high = min(m - s for m, s in zip(means, stds)), max(m + s for m, s in zip(means, stds))
        axis.set_ylim(low - 0.5 * (high - low + 1e-3), high + 0.3 * (high - low + 1e-3))  # differences are small
        axis.set_title(f"held-out: {name}\n({'unseen reward' if name == unseen else 'trained reward'}; ± std over seeds)",
                       fontsize=9)
        axis.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.merge:
        return merge(args)
    import torch

    from dense_rl.config import RewardSpec, load_config
    from dense_rl.loop import build_policy, evaluate, train
    from dense_rl.prompts import load_prompts
    from dense_rl.rewards import WeightedRewards

    torch.set_num_threads(args.threads)
    overrides = (QUICK if args.quick else []) + args.overrides
    seeds = [int(s) for s in args.seed_list.split(",")] if args.seed_list else list(range(2 if args.quick else args.seeds))
    base_config = load_config(args.config, overrides)
    per_epoch = base_config.samples_per_epoch
    epochs = 2 if args.quick else max(1, -(-args.budget // per_epoch))
    heldout = load_prompts(args.heldout)[: 12 if args.quick else None]
    trained_on = [spec.name for spec in base_config.rewards]
    eval_rewards = WeightedRewards(base_config.rewards + [RewardSpec(name=args.unseen_reward)])

    report = Report("sample-efficiency", args.out, {
        "config": args.config, "overrides": overrides, "methods": METHODS, "seeds": seeds, "epochs": epochs,
        "samples_per_epoch": per_epoch, "budget": epochs * per_epoch, "heldout_prompts": len(heldout),
        "trained_rewards": trained_on, "unseen_reward": args.unseen_reward, "eval_seed": EVAL_SEED, "quick": args.quick,
        "torch_threads": args.threads,
    })
    base_pipe, _ = build_policy(base_config)  # LoRA starts at zero: the base model for every seed
    base = evaluate(base_pipe, base_config, eval_rewards, heldout, seed=EVAL_SEED)
    base = {name: base[name] for name in trained_on + [args.unseen_reward]}
    del base_pipe
    report["base_heldout"] = base

    runs = []
    # Seeds outermost: a run cut short still holds every method for the seeds it finished.
    plan = [(seed, method) for seed in seeds for method in METHODS]
    for seed, method in tqdm(plan, desc="runs (seed, method)", unit="run"):
        config = load_config(args.config, overrides + [f"credit.mode={METHODS[method]}", f"run.seed={seed}",
                                                        f"run.num_epochs={epochs}"])
        started, load_before = time.perf_counter(), load_average()
        holder = {}
        history = train(config, show_progress=False, keep_policy=holder)
        scores = evaluate(holder["pipe"], config, eval_rewards, heldout, seed=EVAL_SEED)
        runs.append({
            "method": method, "credit_mode": METHODS[method], "seed": seed,
            "reward_mean": [m["reward_mean"] for m in history], "reward_std": [m["reward_std"] for m in history],
            "approx_kl": [m.get("approx_kl") for m in history],
            "epoch_seconds": [m["epoch_seconds"] for m in history],
            "heldout": {name: scores[name] for name in base}, "wall_seconds": time.perf_counter() - started,
            "load_average_before": load_before, "load_average_after": load_average(),
        })
        report["runs"] = runs
    return finish(report)


def merge(args) -> int:
    """Combine runs written by several invocations (e.g. one process per seed) into one report."""
    import json

    parts = [json.loads((Path(folder) / "results.json").read_text()) for folder in args.merge]
    settings = dict(parts[0]["settings"])
    for part in parts[1:]:
        other = {k: v for k, v in part["settings"].items() if k != "seeds"}
        if other != {k: v for k, v in settings.items() if k != "seeds"}:
            raise SystemExit(f"--merge: {args.merge} were run with different settings; merge only runs of one command")
    settings["seeds"] = sorted({seed for part in parts for seed in part["settings"]["seeds"]})
    settings["merged_from"] = [str(folder) for folder in args.merge]
    report = Report("sample-efficiency", args.out, settings)
    report.data.update(started=min(p["started"] for p in parts), load_average_start=parts[0]["load_average_start"],
                       parts_complete=[p["complete"] for p in parts])
    report["base_heldout"] = parts[0]["base_heldout"]
    report["runs"] = [run for part in parts for run in part.get("runs", [])]
    return finish(report)


def finish(report: Report) -> int:
    """Summary, plot and printed table from the runs in `report`."""
    settings, runs, base = report["settings"], report["runs"], report["base_heldout"]
    trained_on, unseen = settings["trained_rewards"], settings["unseen_reward"]
    samples = np.arange(settings["epochs"]) * settings["samples_per_epoch"]
    summary = summarise(runs, samples)
    report["summary"] = summary
    plot(summary, base, unseen, report.out / "reward_vs_samples.png")
    report.finish()

    def gain(s):
        g = s.get("paired_gain_over_ddpo")
        return None if g is None else f"{g['mean']:+.3f} ± {g['stderr']:.3f}" if g["stderr"] is not None else f"{g['mean']:+.3f}"

    rows = [(m.upper(), s["seeds"], s["first_reward_mean"], s["final_reward_mean"], s["final_reward_std"],
             s["samples_to_reach_ddpo_final"], gain(s), s["heldout"][trained_on[0]]["mean"], s["heldout"][unseen]["mean"])
            for m, s in summary["methods"].items()]
    rows.append(("base", "", None, None, None, None, None, base[trained_on[0]], base[unseen]))
    print(table(rows, ("method", "seeds", "first reward", f"final reward ({summary['smoothing_window_epochs']}-epoch mean)",
                       "± std", "samples to DDPO final", "paired gain vs DDPO",
                       f"held-out {trained_on[0]}", f"held-out {unseen} (unseen)")))
    print(f"\nDDPO final mean reward {summary['ddpo_final_mean_reward']:.4f} at a budget of {settings['budget']} samples")
    for method in ("coca", "uca"):
        ratio = summary[f"ratio_ddpo_over_{method}"]
        print(f"samples to reach it, DDPO / {method.upper()}: "
              + (f"{ratio:.2f}x" if ratio is not None else f"n/a ({method.upper()} did not reach it within the budget)"))
    print(f"(paper: 1.25-2x for CoCA)\nwrote {report.out / 'results.json'} and {report.out / 'reward_vs_samples.png'}")
    return 0
