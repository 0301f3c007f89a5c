"""`python -m dense_rl.bench credit-comparison`: every credit method against a tuned sparse baseline, on
both sampler families, read with an unseen reward as the guard.

For each family (`ddim`: configs/tiny.yaml, DDPO's per-prompt advantages; `flow`: configs/tiny-flow.yaml,
Flow-GRPO's group advantages), training reward and method (`credit.mode`):

1. Tuning: a learning-rate sweep on the tuning seeds (never used for the evaluation), at the budget of
   the evaluation. Each learning rate is scored by what a guarded run keeps: the best held-out trained
   reward among the evaluations whose unseen reward is within `TOLERANCE` of the base model's (the
   checkpoint `guards` + best.json would keep), averaged over the tuning seeds. When the best value is
   at an edge of the sweep, the sweep is widened along `LR_LADDER` until it is inside.
2. Evaluation: the evaluation seeds at each method's chosen learning rate. Every run evaluates the
   policy on fixed held-out prompts and noise every `EVERY` epochs (issue 35's held-out evaluation) with
   the trained reward and the unseen one.

The summary compares, per family and reward, with paired 95 % bootstrap intervals over the evaluation
seeds: each method against the sparse baseline and CoCA against UCA, plain (samples to reach the
baseline's final training reward, `efficiency_stats.crossing_ratio`) and guarded (samples to reach its
final held-out trained reward at an evaluation whose unseen reward is within `TOLERANCE` of the base:
`efficiency_stats.guarded_ratio`). It plots trained against unseen held-out reward per method.

Runs are in-process (`dense_rl.training.trainer.train`, the algorithm the Ray system runs), one file
each in OUT/runs/ as soon as it finishes; the same command resumes, and `--jobs N` runs N at once.
Code: this file (the summary, tables, plot, command line) and `credit_runs.py` (the grid, one run, the
run files, tuning, running many).

    python -m dense_rl.bench credit-comparison --jobs 2                       # the whole grid (many hours on 2 cores)
    python -m dense_rl.bench credit-comparison --families ddim --rewards preference --methods ddpo,uca,coca --jobs 2
    python -m dense_rl.bench credit-comparison --summarise                    # tables and plots from the runs on disk
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from dense_rl.bench import efficiency_stats as stats
from dense_rl.bench.common import Report, print_failures, pyplot, table
from dense_rl.bench.credit_runs import (
    EVALUATION_SEEDS,
    FAMILIES,
    FIRST_SWEEP,
    LR_LADDER,
    TOLERANCE,
    UNSEEN,
    load_run_config,
    lr_name,
    read_runs,
    run_group,
    run_one,
    run_settings,
    tuning_state,
)

# ------------------------------------------------------------------------------------- summary


def evaluation_arrays(runs: dict, family: str, reward: str, method: str, lr: float):
    """[seeds, epochs] training rewards, [seeds, evaluations] held-out trained and unseen rewards and the
    samples of each; None until every evaluation seed is on disk."""
    chosen = [runs.get((family, reward, method, lr, seed)) for seed in EVALUATION_SEEDS]
    if any(run is None for run in chosen):
        return None
    curves = np.array([run["reward_mean"] for run in chosen])
    trained = np.array([[p["trained"] for p in run["heldout_curve"]] for run in chosen])
    unseen = np.array([[p["unseen"] for p in run["heldout_curve"]] for run in chosen])
    samples = np.arange(curves.shape[1]) * chosen[0]["samples_per_epoch"]
    evaluated = np.array([p["samples"] for p in chosen[0]["heldout_curve"]], dtype=float)
    cost = [np.mean(run.get("credit_model_calls_per_sample") or [0.0]) for run in chosen]
    return {"curves": curves, "trained": trained, "unseen": unseen, "samples": samples, "evaluated": evaluated,
            "cost": float(np.mean(cost)), "seconds": float(np.mean([np.mean(run["epoch_seconds"]) for run in chosen]))}


def compare(baseline: dict, method: dict, floor: float, indices) -> dict:
    plain = stats.crossing_ratio(baseline["samples"], baseline["curves"], method["curves"], fractions=(1.0,),
                                 indices=indices)["1"]
    guarded = stats.guarded_ratio(baseline["evaluated"], baseline["trained"], baseline["unseen"], method["trained"],
                                  method["unseen"], floor, indices=indices)
    return {"plain": plain, "guarded": guarded}


def summarise(runs: dict, families: list[str], rewards_of: dict, methods_of: dict) -> list[dict]:
    indices = stats.resample_indices(len(EVALUATION_SEEDS))  # paired: the same resamples for every comparison
    summary = []
    for family in families:
        for reward in rewards_of[family]:
            group = {"family": family, "reward": reward, "methods": {}}
            arrays = {}
            for method in methods_of[family]:
                state = tuning_state(runs, family, reward, method)
                if state["chosen"] is None:
                    continue
                found = evaluation_arrays(runs, family, reward, method, state["chosen"])
                if found is None:
                    continue
                arrays[method] = found
                group["methods"][method] = {
                    "lr": state["chosen"], "lr_inside_sweep": state["inside"],
                    "final_training_reward": stats.mean_interval(found["curves"][:, -1], indices),
                    "final_heldout_trained": stats.mean_interval(found["trained"][:, -1], indices),
                    "final_heldout_unseen": stats.mean_interval(found["unseen"][:, -1], indices),
                    "heldout_trained_mean": found["trained"].mean(0).tolist(),
                    "heldout_unseen_mean": found["unseen"].mean(0).tolist(),
                    "heldout_samples": found["evaluated"].tolist(),
                    "credit_model_calls_per_sample": found["cost"], "epoch_seconds": found["seconds"]}
            if not arrays:
                continue
            base_unseen = float(next(iter(arrays.values()))["unseen"][0, 0])
            group["base_heldout_unseen"], group["guard_floor"] = base_unseen, base_unseen - TOLERANCE
            baseline = FAMILIES[family].baseline
            comparisons = {}
            for method, found in arrays.items():
                if baseline in arrays and method != baseline:
                    comparisons[f"{method} vs {baseline}"] = compare(arrays[baseline], found, base_unseen - TOLERANCE, indices)
            if "coca" in arrays and "uca" in arrays:
                comparisons["coca vs uca"] = compare(arrays["uca"], arrays["coca"], base_unseen - TOLERANCE, indices)
            group["comparisons"] = comparisons
            summary.append(group)
    return summary


def ratio_text(result: dict, guarded: bool) -> str:
    if result["value"] is None:
        if guarded and result.get("baseline_samples") is None:
            return "baseline never (guarded)" if result.get("method_samples") is None else \
                f"only the method ({result['method_samples']:.0f} samples)"
        return "undefined"
    if result["value"] == 0:
        return "never"
    low, high = result["ci_low"], result["ci_high"]
    interval = "" if low is None else f" [{low:.2f}, {high:.2f}]"
    return f"{result['value']:.2f}x{interval}"


def print_tables(summary: list[dict]) -> None:
    for group in summary:
        print(f"\n{group['family']} / {group['reward']}  (guard: unseen {UNSEEN} >= {group['guard_floor']:.3f})")
        rows = []
        for method, found in group["methods"].items():
            rows.append([method, lr_name(found["lr"]) + ("" if found["lr_inside_sweep"] else " (edge)"),
                         f"{found['final_training_reward']['mean']:.3f}", f"{found['final_heldout_trained']['mean']:.3f}",
                         f"{found['final_heldout_unseen']['mean']:.3f}", f"{found['credit_model_calls_per_sample']:.1f}"])
        print(table(rows, ("method", "lr", "final train reward", "held-out trained", "held-out unseen", "credit calls/sample")))
        rows = [[name, ratio_text(result["plain"], False), ratio_text(result["guarded"], True)]
                for name, result in group["comparisons"].items()]
        if rows:
            print(table(rows, ("comparison", "plain ratio [95% CI]", "guarded ratio [95% CI]")))


def plot(summary: list[dict], path: Path) -> None:
    """Held-out trained against unseen reward per method, one panel per (family, reward)."""
    if not summary:
        return
    plt = pyplot()
    figure, axes = plt.subplots(1, len(summary), figsize=(4.6 * len(summary), 4), dpi=110, squeeze=False)
    for axis, group in zip(axes[0], summary):
        for method, found in group["methods"].items():
            axis.plot(found["heldout_unseen_mean"], found["heldout_trained_mean"], "-o", markersize=3,
                      label=f"{method} (lr {lr_name(found['lr'])})")
        axis.axvline(group["guard_floor"], color="tab:red", linestyle=":", label=f"base - {TOLERANCE}")
        axis.set_xlabel(f"held-out {UNSEEN} (unseen)")
        axis.set_ylabel(f"held-out {group['reward']} (trained)")
        axis.set_title(f"{group['family']} / {group['reward']}", fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


# ------------------------------------------------------------------------------------- command line


def selection(args) -> tuple[list[str], dict, dict]:
    families = [f for f in args.families.split(",") if f]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise SystemExit(f"--families: unknown family {unknown[0]!r}; choose from {', '.join(FAMILIES)}")
    rewards_of, methods_of = {}, {}
    for family in families:
        spec = FAMILIES[family]
        rewards_of[family] = [r for r in (args.rewards.split(",") if args.rewards else spec.rewards) if r in spec.rewards]
        methods_of[family] = [m for m in (args.methods.split(",") if args.methods else spec.methods) if m in spec.methods]
        if not rewards_of[family] or not methods_of[family]:
            raise SystemExit(f"--rewards/--methods: nothing of family {family} selected; its rewards are "
                             f"{', '.join(spec.rewards)} and its methods {', '.join(spec.methods)}")
    return families, rewards_of, methods_of


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m dense_rl.bench credit-comparison", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/benchmarks/credit-comparison")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--rewards", help="comma-separated (default: each family's)")
    parser.add_argument("--methods", help="comma-separated (default: each family's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config overrides shared by every run")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, each its own process (default %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="2 epochs of 8 samples, 10 steps: a smoke test")
    parser.add_argument("--summarise", action="store_true", help="no runs: tables, plot and results.json from the runs on disk")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # family,reward,method,lr,seed: one run (what --jobs starts)
    args = parser.parse_args(argv)
    settings = run_settings(args.quick, args.overrides)
    out = Path(args.out)
    if args.one:
        family, reward, method, lr, seed = args.one.split(",")
        run_one(args, settings, (family, reward, method, float(lr), int(seed)))
        return 0
    families, rewards_of, methods_of = selection(args)
    for family in families:  # every config loads before anything trains
        for reward in rewards_of[family]:
            for method in methods_of[family]:
                load_run_config(settings, (family, reward, method, FIRST_SWEEP[0], 0), out / "scratch")
    report = Report("credit-comparison", out, {**settings, "families": families, "rewards": rewards_of,
                                               "methods": methods_of, "lr_ladder": LR_LADDER,
                                               "first_sweep": FIRST_SWEEP, "jobs": args.jobs, "threads": args.threads,
                                               "tolerance": TOLERANCE})
    failures = []
    if not args.summarise:
        bar = tqdm(total=0, desc="runs (family, reward, method, lr, seed)", unit="run")
        for family in families:
            for reward in rewards_of[family]:
                failures += run_group(args, settings, family, reward, methods_of[family], bar)
        bar.close()
    runs = read_runs(out / "runs", settings)
    ran = {key[:3] for key in runs}  # a selection may name groups that have not run yet
    report["tuning"] = [{**tuning_state(runs, f, r, m), "to_run": None} for f in families for r in rewards_of[f]
                        for m in methods_of[f] if (f, r, m) in ran]
    report["runs"] = [runs[key] for key in sorted(runs, key=lambda k: tuple(map(str, k)))]
    summary = summarise(runs, families, rewards_of, methods_of)
    report["summary"] = summary
    print_tables(summary)
    plot(summary, out / "trained-vs-unseen.png")
    print(f"\nresults in {report.finish()}")
    return print_failures(failures)
