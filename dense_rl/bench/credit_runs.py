"""The credit comparison's runs: the grid's families, methods and learning-rate ladder, one run (train
in-process with held-out evaluations, then its record), the run files, the tuning of each sweep, and
running many (`--jobs`). The summary and the command line are in credit_comparison.py."""

from __future__ import annotations

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

from dense_rl.bench.common import load_average
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
