"""DDPO (sparse credit) vs UCA (uniform) vs CoCA vs reward-gain credit at a fixed sample budget, per reward.

Every run uses the in-process reference loop (`dense_rl.training.trainer.train`, the same algorithm the Ray system
runs) with identical settings and seeds; only `credit.mode` differs. So for a given seed every method
samples the very same first batch and draws the same prompts and noise seeds every epoch, and they
differ afterwards only through what they learned. Each training reward is a sweep of its own
(`--rewards`); the final policies are scored on held-out prompts by the reward they trained on and by
one no run trains on (`--unseen-reward`).

Reports, per reward and method, with 95 % percentile-bootstrap intervals over seeds (paired: the
same resampled seeds for every method; `dense_rl/bench/efficiency_stats.py`): the ratio "samples
DDPO needs / samples the method needs" to reach DDPO's final reward and two lower thresholds (50 % and
75 % of the way from the first-epoch reward to it), the paired per-epoch gain over DDPO, the area under
the reward-vs-samples curve, the held-out rewards, and the cost of an epoch.

The grid (rewards x methods x seeds) is resumable: every run writes OUT/runs/<reward>__<method>__seed<N>.json
as soon as it finishes, and the same command run again skips the runs already there. `--jobs N` runs N
of them at once, each a single-thread process. `--merge` combines the folders of several sittings.

    python -m dense_rl.bench sample-efficiency                    # the full grid: 3 rewards x 4 methods x 5 seeds
    python -m dense_rl.bench sample-efficiency --jobs 2           # the same, two runs at a time
    python -m dense_rl.bench sample-efficiency --quick            # a small version for CI
    python -m dense_rl.bench sample-efficiency --merge A B --out C

Code: this file (the command line, the plan, merging, the printed table), `efficiency_runs.py` (one run,
the run files, --jobs), `efficiency_summary.py` (runs -> results.json's summary), `efficiency_stats.py`
(the statistics), `efficiency_plots.py`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from dense_rl.bench import efficiency_stats as stats
from dense_rl.bench.common import Report, print_failures, table
from dense_rl.bench.efficiency_plots import LABELS, plot_credit, plot_curves, plot_heldout, plot_samples
from dense_rl.bench.efficiency_runs import (
    METHODS,
    RUN_SETTINGS,
    base_heldout,
    check_configs,
    execute_run,
    existing_runs,
    key_of,
    read_runs,
    run_file,
    run_grid,
    runs_to_do,
    samples_file,
    settings_difference,
    write_atomic,
    write_json_atomic,
    write_run,
)
from dense_rl.bench.efficiency_summary import summarise

REWARDS = ("preference", "brightness", "darkness")  # why not the JPEG pair: docs/benchmarks.md, "Rewards with headroom"
UNSEEN_REWARD = "digit_alignment"
SEEDS = 5
# 24 epochs of the tiny preset's 32 samples: where DDPO's curve on the preference reward has risen
# and begun to flatten (a 1024-sample DDPO run per reward; docs/benchmarks.md, "Choosing the budget").
BUDGET = 768
EVAL_SEED = 1234
QUICK = ["sample.num_steps=10", "sample.batch_size=8", "sample.num_batches_per_epoch=1", "train.batch_size=8"]
QUICK_SEEDS, QUICK_EPOCHS, QUICK_HELDOUT, QUICK_REWARDS = 2, 2, 12, ("preference",)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m dense_rl.bench sample-efficiency",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench/sample-efficiency",
                        help="output folder: runs/ (one file per run), results.json, plots (default %(default)s)")
    parser.add_argument("--config", default="configs/tiny.yaml", help="the preset every run starts from (default %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config overrides shared by every run (not credit.mode, run.seed, run.num_epochs, rewards)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, of {', '.join(f'{m} ({c})' for m, c in METHODS.items())} "
                             "(default: all four)")
    parser.add_argument("--rewards", default=None,
                        help=f"comma-separated training rewards, each its own sweep (default {','.join(REWARDS)}; "
                             f"--quick: {','.join(QUICK_REWARDS)})")
    parser.add_argument("--seeds", type=int, default=SEEDS, help="seeds per method and reward: 0, 1, ... (default %(default)s; --quick: 2)")
    parser.add_argument("--seed-list", help="comma-separated seeds to run instead of 0..--seeds-1")
    parser.add_argument("--budget", type=int, default=BUDGET,
                        help="samples per run, rounded up to whole epochs (default %(default)s: 24 epochs of "
                             "the tiny preset's 32 samples)")
    parser.add_argument("--heldout", default="embedded:tiny_heldout", help="prompts for the final evaluation (default %(default)s)")
    parser.add_argument("--unseen-reward", default=UNSEEN_REWARD, help="a reward no run trains on, scored at the end (default %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_SEEDS} seeds, {QUICK_EPOCHS} epochs of 8 samples, 10 steps, one reward: for CI")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at once, each a separate single-thread process (default 1: one after the other, in this process)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (default 1: on shared cores, more threads mostly wait for each other)")
    parser.add_argument("--num-resamples", type=int, default=stats.NUM_RESAMPLES, help="bootstrap resamples (default %(default)s)")
    parser.add_argument("--merge", nargs="+", metavar="DIR",
                        help="combine these --out folders (or their runs/ folders) into --out, and summarise")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # reward,method,seed: one run (what --jobs starts)
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------- the plan


def plan_grid(rewards, methods, seeds) -> list[tuple[str, str, int]]:
    """Every (reward, method, seed) of the grid, seeds outermost: a sweep cut short holds every
    method and reward of the seeds it finished, and a partial grid still pairs."""
    return [(reward, method, seed) for seed in seeds for reward in rewards for method in methods]


def selection(args) -> tuple[list[str], list[str], list[int]]:
    """The rewards, methods and seeds of this command, checked before anything is trained."""
    from dense_rl.rewards import REWARD_NAMES

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    rewards = [r.strip() for r in (args.rewards or ",".join(QUICK_REWARDS if args.quick else REWARDS)).split(",")
               if r.strip()]
    for reward in rewards + [args.unseen_reward]:
        if reward not in REWARD_NAMES:
            raise SystemExit(f"--rewards/--unseen-reward: unknown reward {reward!r}; choose from {', '.join(sorted(REWARD_NAMES))}")
    if args.unseen_reward in rewards:
        raise SystemExit(f"--unseen-reward {args.unseen_reward} is also a training reward; pick one no run trains on")
    if args.seed_list:
        seeds = sorted({int(s) for s in args.seed_list.split(",")})
    else:
        seeds = list(range(QUICK_SEEDS if args.quick else args.seeds))
    if not methods or not rewards or not seeds:
        raise SystemExit("nothing to run: give at least one method, reward and seed")
    return rewards, methods, seeds


def run_settings(args) -> tuple[dict, object]:
    """The settings every run of this command shares (RUN_SETTINGS), and the base config."""
    from dense_rl.config import load_config
    from dense_rl.training.prompts import load_prompts

    overrides = (QUICK if args.quick else []) + list(args.overrides)
    base_config = load_config(args.config, overrides)
    per_epoch = base_config.samples_per_epoch
    epochs = QUICK_EPOCHS if args.quick else max(1, -(-args.budget // per_epoch))  # ceil: whole epochs
    heldout = len(load_prompts(args.heldout)[: QUICK_HELDOUT if args.quick else None])
    settings = {"config": args.config, "overrides": overrides, "epochs": epochs, "samples_per_epoch": per_epoch,
                "num_steps": base_config.sample.num_steps, "window_size": base_config.credit.window_size,
                "heldout": args.heldout, "heldout_prompts": heldout, "unseen_reward": args.unseen_reward,
                "eval_seed": EVAL_SEED, "quick": args.quick}
    return settings, base_config


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.merge:
        return merge(args)
    settings, base_config = run_settings(args)
    out, runs_dir = Path(args.out), Path(args.out) / "runs"
    if args.one:  # a child of --jobs: one run, its file, nothing else
        reward, method, seed = args.one.split(",")
        key = (reward, method, int(seed))
        write_run(runs_dir, key, *execute_run(settings, key, args.threads))
        return 0

    rewards, methods, seeds = selection(args)
    check_configs(settings, rewards, methods)
    existing = existing_runs(runs_dir, settings)
    grid = plan_grid(rewards, methods, seeds)
    todo = runs_to_do(grid, existing)
    report = Report("sample-efficiency", out, {
        **settings, "rewards": rewards, "methods": {m: METHODS[m] for m in methods}, "seeds": seeds,
        "budget": settings["epochs"] * settings["samples_per_epoch"], "jobs": args.jobs, "torch_threads": args.threads,
        "num_resamples": args.num_resamples, "bootstrap_seed": stats.BOOTSTRAP_SEED,
        "runs_on_disk_at_start": len(grid) - len(todo),
    })
    print(f"{len(grid)} runs in the grid, {len(grid) - len(todo)} already in {runs_dir}, {len(todo)} to run", file=sys.stderr)
    report["base_heldout"] = base_heldout(out, settings, base_config, rewards + [args.unseen_reward])
    failures = run_grid(args, settings, todo, len(grid) - len(todo), len(grid)) if todo else []
    runs = existing_runs(runs_dir, settings)  # read back: with --jobs the children wrote them
    report.data["runs"] = [runs[key] for key in grid if key in runs]
    finish(report, grid)
    return print_failures(failures)


# ------------------------------------------------------------------------------------- merging


def _runs_of_results(results: dict) -> list[dict]:
    """The runs of a results.json, in the run-file layout (older results.json held the runs of one
    training reward and no per-run settings)."""
    settings = results["settings"]
    runs = []
    for run in results.get("runs", []):
        run = dict(run)
        run.setdefault("reward", (settings.get("rewards") or settings.get("trained_rewards"))[0])
        run.setdefault("settings", {name: settings.get(name) for name in RUN_SETTINGS})
        runs.append(run)
    return runs


def load_part(folder: Path) -> dict:
    """The runs, grid and base scores of one folder to merge: an --out folder (runs/ inside, or only
    a results.json from before runs/ existed) or a runs/ folder itself."""
    folder = Path(folder)
    is_runs_folder = not (folder / "runs").is_dir() and any(folder.glob("*__*__seed*.json"))
    home = folder.parent if is_runs_folder else folder  # the --out folder: results.json, base_heldout.json
    results = json.loads((home / "results.json").read_text()) if (home / "results.json").is_file() else None
    runs_dir = folder if is_runs_folder else folder / "runs"
    if runs_dir.is_dir():
        runs = [run for _, run in read_runs(runs_dir).values()]
    elif results is not None:
        runs = _runs_of_results(results)
    else:
        raise SystemExit(f"--merge: {folder} holds no runs/ folder, no run files and no results.json")
    base = {}
    if (home / "base_heldout.json").is_file():
        base = json.loads((home / "base_heldout.json").read_text())["scores"]
    if results is not None:
        base = {**results.get("base_heldout", {}), **base}
    # The grid a part meant to run (from its results.json), and every run it holds.
    grid = {"rewards": [], "methods": [], "seeds": []}
    if results is not None:
        s = results["settings"]
        grid = {"rewards": list(s.get("rewards") or s.get("trained_rewards") or []),
                "methods": list(s.get("methods") or []), "seeds": list(s.get("seeds") or [])}
    grid["rewards"] += [r["reward"] for r in runs]
    grid["methods"] += [r["method"] for r in runs]
    grid["seeds"] += [int(r["seed"]) for r in runs]
    return {"runs": runs, "base": base, "grid": grid, "folder": str(folder), "runs_dir": runs_dir,
            "base_samples": home / "base_heldout.png"}


def merge(args) -> int:
    """Combine runs written by several invocations (other sittings, other machines) into one report;
    the runs are copied into OUT/runs, so the same command can then complete the grid there."""
    parts = [load_part(Path(folder)) for folder in args.merge]
    runs, samples, reference, duplicates = {}, {}, None, 0  # reference: the first run's settings, which all share
    for part in parts:
        for run in part["runs"]:
            if reference is None:
                reference = run["settings"]
            difference = settings_difference(reference, run["settings"])
            if difference:
                raise SystemExit(f"--merge: {part['folder']} has {'/'.join(map(str, key_of(run)))} run with {difference}"
                                 .replace("this command", "the first part") + "; merge only runs of one command")
            if key_of(run) in runs:
                duplicates += 1
            else:
                runs[key_of(run)] = run
                samples[key_of(run)] = samples_file(part["runs_dir"], key_of(run))
    if reference is None:
        raise SystemExit(f"--merge: no runs in {', '.join(args.merge)}")
    out = Path(args.out)
    on_disk = existing_runs(out / "runs", reference)
    for key, run in runs.items():
        if key not in on_disk:
            if samples[key].is_file():
                write_atomic(samples_file(out / "runs", key), samples[key].read_bytes())
            write_json_atomic(run_file(out / "runs", key), run)
    runs = {**runs, **on_disk}
    base_samples = [part["base_samples"] for part in parts if part["base_samples"].is_file()]
    if base_samples and not (out / "base_heldout.png").is_file():
        shutil.copyfile(base_samples[0], out / "base_heldout.png")
    seen = list(dict.fromkeys(r for part in parts for r in part["grid"]["rewards"]))
    rewards = sorted(seen, key=lambda r: (REWARDS.index(r) if r in REWARDS else len(REWARDS), seen.index(r)))
    methods = [m for m in METHODS if any(m in part["grid"]["methods"] for part in parts)]
    seeds = sorted({s for part in parts for s in part["grid"]["seeds"]})
    grid = plan_grid(rewards, methods, seeds)
    report = Report("sample-efficiency", out, {
        **reference, "rewards": rewards, "methods": {m: METHODS[m] for m in methods}, "seeds": seeds,
        "budget": reference["epochs"] * reference["samples_per_epoch"], "num_resamples": args.num_resamples,
        "bootstrap_seed": stats.BOOTSTRAP_SEED, "merged_from": [str(folder) for folder in args.merge],
        "duplicate_runs_dropped": duplicates,
    })
    base = {}
    for part in parts:
        base = {**part["base"], **base}  # the first part's score wins
    report.data["base_heldout"] = base
    report.data["runs"] = [runs[key] for key in grid if key in runs]
    finish(report, grid)
    return 0


# ------------------------------------------------------------------------------------- report


def _interval(value: float, low: float | None, high: float | None, fmt: str = ".3g") -> str:
    text = format(value, fmt)
    return text if low is None else f"{text} [{format(low, fmt)}, {format(high, fmt)}]"


def _ratio_cell(ratio: dict | None) -> str:
    if ratio is None:
        return "-"
    if ratio["value"] == 0 and ratio["fraction_never"] == 1:
        return "0 (never reached)"
    text = "n/a" if ratio["value"] is None else _interval(ratio["value"], ratio["ci_low"], ratio["ci_high"])
    extras = [f"never {ratio['fraction_never']:.0%}" if ratio["fraction_never"] else "",
              f"undef. {ratio['fraction_undefined']:.0%}" if ratio["fraction_undefined"] else ""]
    extras = [e for e in extras if e]
    return text + (f" ({', '.join(extras)} of resamples)" if extras else "")


def _stat_cell(stat: dict | None, signed: bool = False) -> str:
    if stat is None:
        return "-"
    return _interval(stat["mean"], stat["ci_low"], stat["ci_high"], "+.3g" if signed else ".3g")


def print_tables(summary: dict, settings: dict, base: dict) -> None:
    unseen = settings["unseen_reward"]
    fractions = [f"{f:g}" for f in summary["thresholds"]]
    for reward, sweep in summary["rewards"].items():
        print(f"\n## trained on {reward} ({len(sweep['seeds_paired'])} paired seeds, budget {settings['epochs'] * settings['samples_per_epoch']} samples)")
        rows = []
        for method, entry in sweep["methods"].items():
            ratios = entry.get("ratio_vs_ddpo") or {}
            gain = entry.get("paired_gain_over_ddpo")
            rows.append((LABELS[method], entry["seeds"], _stat_cell(entry["final_reward"]),
                         *[_ratio_cell(ratios.get(f)) if method != "ddpo" else "1 (reference)" for f in fractions],
                         _stat_cell(gain, signed=True) if gain else "-", _stat_cell(entry["auc"]),
                         _stat_cell(entry["heldout"].get(reward)), _stat_cell(entry["heldout"].get(unseen)),
                         entry["median_epoch_seconds"], entry["median_score_seconds"]))
        rows.append(("base model", "", "", *[""] * len(fractions), "", "", base.get(reward), base.get(unseen), None, None))
        print(table(rows, ("method", "seeds", f"final reward ({summary['smoothing_window_epochs']}-epoch mean)",
                           *[f"DDPO/method samples to {float(f):.0%}" for f in fractions],
                           "paired gain vs DDPO", "AUC (mean reward)", f"held-out {reward}",
                           f"held-out {unseen} (unseen)", "s/epoch (median)", "score s/epoch (median)")))
        if sweep.get("ddpo_final_reward") is not None:
            print(f"DDPO: first-epoch reward {sweep['ddpo_first_reward']:.4g}, final {sweep['ddpo_final_reward']:.4g}; thresholds "
                  + ", ".join(f"{float(f):.0%} = {t:.4g}" for f, t in sweep["targets"].items()))
    grid = summary["grid"]
    if grid["complete"]:
        print(f"\ngrid complete: {grid['expected_runs']} runs")
    else:
        missing = [f"{m['reward']}/{m['method']}/seed{m['seed']}" for m in grid["missing"]]
        print(f"\ngrid INCOMPLETE: {grid['present_runs']} of {grid['expected_runs']} runs; missing: "
              + ", ".join(missing[:12]) + (f", ... ({len(missing) - 12} more)" if len(missing) > 12 else ""))
    print("ratios: samples DDPO needs / samples the method needs, 95 % paired bootstrap over seeds "
          f"({summary['num_resamples']} resamples); 0 = never reached (paper: 1.25-2x for CoCA at 100 %)")


def finish(report: Report, grid: list[tuple]) -> None:
    """Summary, plots and printed tables from the runs in `report`."""
    settings, runs, base = report["settings"], report["runs"], report["base_heldout"]
    summary = summarise(runs, grid, settings, settings["num_resamples"])
    report.data["summary"] = summary
    plot_curves(summary, report.out / "reward_vs_samples.png")
    plot_heldout(summary, base, report.out / "heldout.png")
    wrote = ["results.json", "reward_vs_samples.png", "heldout.png"]
    if plot_credit(summary, report.out / "step_weights.png"):
        wrote.append("step_weights.png")
    if plot_samples(report.out, report.out / "runs", grid, report.out / "samples.png"):
        wrote.append("samples.png")
    report.finish()
    print_tables(summary, settings, base)
    print(f"wrote {', '.join(str(report.out / name) for name in wrote)}")
