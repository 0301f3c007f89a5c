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

    python -m dense_rl.bench credit-comparison --jobs 2                       # the whole grid (many hours on 2 cores)
    python -m dense_rl.bench credit-comparison --families ddim --rewards preference --methods ddpo,uca,coca --jobs 2
    python -m dense_rl.bench credit-comparison --summarise                    # tables and plots from the runs on disk
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from dense_rl.bench import efficiency_stats as stats
from dense_rl.bench.common import Report, load_average, pyplot, table
from dense_rl.bench.efficiency_runs import write_json_atomic


@dataclass(frozen=True)
class Family:
    preset: str
    baseline: str  # the sparse method every other one is compared with
    methods: tuple[str, ...]
    rewards: tuple[str, ...]


FAMILIES = {
    "ddim": Family("configs/tiny.yaml", "ddpo", ("ddpo", "uca", "coca", "reward_gain", "ode_gain"),
                   ("preference", "brightness", "darkness")),
    "flow": Family("configs/tiny-flow.yaml", "flow_grpo", ("flow_grpo", "uca", "coca", "reward_gain", "ode_gain"),
                   ("preference", "brightness")),
}
CREDIT_MODES = {"ddpo": "sparse", "flow_grpo": "sparse", "uca": "uniform", "coca": "coca",
                "reward_gain": "reward_gain", "ode_gain": "ode_gain"}
LR_LADDER = (3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
FIRST_SWEEP = (3e-4, 1e-3, 3e-3)  # around the presets' 1e-3
TUNING_SEEDS = (100, 101)
EVALUATION_SEEDS = (0, 1, 2, 3, 4)
EPOCHS = 16  # of the presets' 32 samples: 512 samples a run
EVERY = 2  # epochs between held-out evaluations
HELDOUT_PROMPTS = 16
UNSEEN = "digit_alignment"
TOLERANCE = 0.02  # how far below the base model the unseen reward may be at a guarded point
QUICK = {"overrides": ["sample.num_steps=10", "sample.batch_size=4", "sample.num_batches_per_epoch=2",
                       "train.batch_size=8"],
         "epochs": 2, "every": 1, "heldout_prompts": 4}
RUN_FORMAT = 1


def lr_name(lr: float) -> str:
    return f"{lr:g}"


# ------------------------------------------------------------------------------------- settings and runs


def run_settings(quick: bool, overrides: list[str]) -> dict:
    """What every run of this command shares; a run on disk with other settings is another experiment."""
    if quick:
        return {"overrides": QUICK["overrides"] + overrides, "epochs": QUICK["epochs"], "every": QUICK["every"],
                "heldout_prompts": QUICK["heldout_prompts"], "unseen_reward": UNSEEN, "quick": True}
    return {"overrides": list(overrides), "epochs": EPOCHS, "every": EVERY, "heldout_prompts": HELDOUT_PROMPTS,
            "unseen_reward": UNSEEN, "quick": False}


def run_name(key: tuple) -> str:
    family, reward, method, lr, seed = key
    return f"{family}__{reward}__{method}__lr{lr_name(lr)}__seed{seed}"


def run_overrides(settings: dict, key: tuple, scratch: Path) -> list[str]:
    family, reward, method, lr, seed = key
    # The held-out base scores are cached in scratch/.heldout-base, shared by every run of a family.
    return settings["overrides"] + [
        f"rewards=[{{name: {reward}}}]", f"credit.mode={CREDIT_MODES[method]}", f"train.lr={lr_name(lr)}",
        f"run.seed={seed}", f"run.num_epochs={settings['epochs']}", f"run.save_every={settings['epochs']}",
        f"evaluation.every_epochs={settings['every']}", f"evaluation.max_prompts={settings['heldout_prompts']}",
        f"evaluation.rewards=[{settings['unseen_reward']}]", f"run.output_dir={scratch}", f"run.name={run_name(key)}"]


def load_run_config(settings: dict, key: tuple, scratch: Path):
    from dense_rl.config import load_config

    return load_config(FAMILIES[key[0]].preset, run_overrides(settings, key, scratch))


def heldout_curve(rows: list[dict], reward: str, unseen: str) -> list[dict]:
    """heldout.parquet's rows as one point per evaluated policy: samples trained on, trained and unseen mean."""
    points: dict[int, dict] = {}
    for row in rows:
        if row["reward"] in (reward, unseen):
            point = points.setdefault(row["policy_version"], {"policy_version": row["policy_version"],
                                                              "samples": row["samples"]})
            point["trained" if row["reward"] == reward else "unseen"] = row["mean"]
    return [points[version] for version in sorted(points)]


def execute_run(settings: dict, key: tuple, out: Path, threads: int = 1) -> dict:
    """Train one (family, reward, method, lr, seed) in this process with held-out evaluations; returns
    its run record (the sample-efficiency grid's fields, plus family, lr and the held-out curve)."""
    import torch

    from dense_rl.run.heldout import read_heldout
    from dense_rl.run.storage import RunDir
    from dense_rl.training.trainer import train

    torch.set_num_threads(threads)
    family, reward, method, lr, seed = key
    scratch = out / "scratch"
    config = load_run_config(settings, key, scratch)
    folder = scratch / run_name(key)
    shutil.rmtree(folder, ignore_errors=True)  # a run cut short starts again
    started, load_before = time.perf_counter(), load_average()
    history = train(config, run_uri=str(folder), show_progress=False)
    curve = heldout_curve(read_heldout(RunDir(str(folder))), reward, settings["unseen_reward"])
    shutil.rmtree(folder)  # what the record needs is read; the base scores' cache stays
    per_epoch = ("reward_mean", "reward_std", "learner_approx_kl", "learner_clipfrac", "epoch_seconds",
                 "credit_model_calls_per_sample", "credit_seconds_per_sample")
    record = {"format": RUN_FORMAT, "family": family, "reward": reward, "method": method,
              "credit_mode": CREDIT_MODES[method], "lr": lr, "seed": seed,
              "phase": "tuning" if seed in TUNING_SEEDS else "evaluation", "settings": settings,
              "samples_per_epoch": config.samples_per_epoch}
    record.update({name: [m.get(name) for m in history] for name in per_epoch if any(name in m for m in history)})
    record.update({"heldout_curve": curve, "wall_seconds": time.perf_counter() - started, "torch_threads": threads,
                   "load_average_before": load_before, "load_average_after": load_average(),
                   "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return record


def read_runs(runs_dir: Path, settings: dict) -> dict[tuple, dict]:
    runs = {}
    for path in sorted(Path(runs_dir).glob("*__seed*.json")):
        run = json.loads(path.read_text())
        if run["settings"] != settings:
            raise SystemExit(f"{path} was run with other settings ({run['settings']}); resume with the same ones "
                             "or use another --out")
        runs[run["family"], run["reward"], run["method"], float(run["lr"]), int(run["seed"])] = run
    return runs


# ------------------------------------------------------------------------------------- tuning


def guarded_best(run: dict, tolerance: float = TOLERANCE) -> float:
    """The best held-out trained reward of a run at an evaluation whose unseen reward is within
    `tolerance` of the base model's; the base model's own trained reward when no evaluation is."""
    base, *evaluated = run["heldout_curve"]
    kept = [point["trained"] for point in evaluated if point["unseen"] >= base["unseen"] - tolerance]
    return max(kept, default=base["trained"])


def tuning_state(runs: dict, family: str, reward: str, method: str, seeds=TUNING_SEEDS) -> dict:
    """The sweep of one (family, reward, method) as it stands: the learning rates tried (every tuning
    seed on disk), their scores, the chosen one, and the learning rates still to run (the first sweep,
    or the next ladder rung beyond an edge that is best). `inside`: the chosen value has a tried value
    on each side."""
    def complete(lr):
        return all((family, reward, method, lr, seed) in runs for seed in seeds)

    swept = sorted({lr for (f, r, m, lr, s) in runs if (f, r, m) == (family, reward, method)} | set(FIRST_SWEEP))
    missing = [lr for lr in swept if not complete(lr)]
    scores = {lr: float(np.mean([guarded_best(runs[family, reward, method, lr, seed]) for seed in seeds]))
              for lr in swept if complete(lr)}
    state = {"family": family, "reward": reward, "method": method, "tried": sorted(scores),
             "scores": {lr_name(lr): score for lr, score in sorted(scores.items())}, "chosen": None,
             "inside": False, "to_run": missing, "tuning_seeds": list(seeds), "evaluation_seeds": list(EVALUATION_SEEDS),
             "criterion": f"mean over tuning seeds of the best held-out trained reward with the unseen reward "
                          f"within {TOLERANCE} of the base model's"}
    if missing:
        return state
    chosen = max(scores, key=scores.get)
    tried = sorted(scores)
    state["chosen"] = chosen
    state["inside"] = tried[0] < chosen < tried[-1]
    if not state["inside"]:
        rung = LR_LADDER.index(chosen) + (-1 if chosen == tried[0] else 1)
        if 0 <= rung < len(LR_LADDER) and LR_LADDER[rung] not in scores:
            state["to_run"] = [LR_LADDER[rung]]
    return state


# ------------------------------------------------------------------------------------- running


def run_one(args, settings: dict, key: tuple) -> None:
    write_json_atomic(Path(args.out) / "runs" / f"{run_name(key)}.json",
                      execute_run(settings, key, Path(args.out), args.threads))


def child(args, key: tuple) -> tuple[tuple, int, Path]:
    """One run as its own process (`--one`), its output in OUT/logs/."""
    log = Path(args.out) / "logs" / f"{run_name(key)}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    command = [sys.executable, "-m", "dense_rl.bench", "credit-comparison", "--out", args.out,
               "--threads", str(args.threads), "--one", ",".join(map(str, key))]
    command += ["--quick"] if args.quick else []
    for override in args.overrides:
        command += ["--set", override]
    with log.open("w") as handle:
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env).returncode
    return key, code, log


def run_batch(args, settings: dict, todo: list[tuple], bar) -> list[str]:
    failures = []
    if args.jobs <= 1:
        for key in todo:
            bar.set_postfix_str(run_name(key))
            try:
                run_one(args, settings, key)
            except Exception as error:  # one failed run must not lose the others
                traceback.print_exc()
                failures.append(f"{run_name(key)}: {type(error).__name__}: {error}")
            bar.update(1)
        return failures
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for future in as_completed([pool.submit(child, args, key) for key in todo]):
            key, code, log = future.result()
            if code != 0:
                tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
                failures.append(f"{run_name(key)}: exit {code}, {tail[0]} (log: {log})")
            bar.update(1)
    return failures


def run_group(args, settings: dict, family: str, reward: str, methods: list[str], bar) -> list[str]:
    """Tune every method of one (family, reward), widening the sweeps until each choice is inside
    (or the ladder ends), then run the evaluation seeds at the chosen learning rates."""
    runs_dir, failures = Path(args.out) / "runs", []
    while True:
        runs = read_runs(runs_dir, settings)
        todo = [(family, reward, method, lr, seed) for method in methods
                for lr in tuning_state(runs, family, reward, method)["to_run"] for seed in TUNING_SEEDS]
        todo = [key for key in todo if key not in runs]
        if not todo or failures:
            break
        bar.total += len(todo)
        bar.refresh()
        failures += run_batch(args, settings, todo, bar)
    if failures:
        return failures
    runs = read_runs(runs_dir, settings)
    todo = [(family, reward, method, tuning_state(runs, family, reward, method)["chosen"], seed)
            for method in methods for seed in EVALUATION_SEEDS]
    todo = [key for key in todo if key not in runs]
    bar.total += len(todo)
    bar.refresh()
    return run_batch(args, settings, todo, bar)


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
    report["tuning"] = [{**tuning_state(runs, f, r, m), "to_run": None} for f in families for r in rewards_of[f]
                        for m in methods_of[f]]
    report["runs"] = [runs[key] for key in sorted(runs, key=lambda k: tuple(map(str, k)))]
    summary = summarise(runs, families, rewards_of, methods_of)
    report["summary"] = summary
    print_tables(summary)
    plot(summary, out / "trained-vs-unseen.png")
    print(f"\nresults in {report.finish()}")
    if failures:
        print(f"{len(failures)} run(s) failed; the same command reruns them:", file=sys.stderr)
        for line in failures:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0
