"""One run of the sample-efficiency grid: training and evaluation, its file on disk, and running many.

A run is one (reward, method, seed). It trains with the in-process reference loop and scores the
final policy on held-out prompts, then is written to OUT/runs/<reward>__<method>__seed<N>.json as soon
as it finishes (with its final policy's held-out samples beside it, <name>.png), so a sweep cut short
keeps every run it finished and the same command resumes it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm.auto import tqdm

from dense_rl.bench.common import finite_or_none, load_average

METHODS = {"ddpo": "sparse", "uca": "uniform", "coca": "coca", "reward_gain": "reward_gain"}  # name -> credit.mode
# What makes two runs comparable: a run on disk with any of these different is not the same run.
RUN_SETTINGS = ("config", "overrides", "epochs", "samples_per_epoch", "num_steps", "window_size", "heldout",
                "heldout_prompts", "unseen_reward", "eval_seed", "quick")
# Per-epoch metrics of loop.train kept in a run file (when the loop reports them).
PER_EPOCH = ("reward_mean", "reward_std", "learner_approx_kl", "epoch_seconds", "seconds_sample", "seconds_score",
             "seconds_advantages", "seconds_update", "credit_fallbacks")
# Per-epoch lists of T floats (the credit profile): absent for sparse credit, or from an older loop.
PROFILE = ("step_weight_mean_per_step", "step_weight_std_per_step", "cosine_mean_per_step")
RUN_FORMAT = 1

# ------------------------------------------------------------------------------------- run files


def run_name(key: tuple[str, str, int]) -> str:
    reward, method, seed = key
    return f"{reward}__{method}__seed{seed}"


def run_file(runs_dir: Path, key: tuple[str, str, int]) -> Path:
    return Path(runs_dir) / f"{run_name(key)}.json"


def samples_file(runs_dir: Path, key: tuple[str, str, int]) -> Path:
    return Path(runs_dir) / f"{run_name(key)}.png"


def write_samples(path: Path, images) -> None:
    """The held-out samples (uint8 [N, 3, H, W], prompts in the held-out order: six colours of each
    digit) as one PNG, a row per digit: what a reader looks at to see a reward saturate or be gamed."""
    from dense_rl.run.plots import image_grid_png

    write_atomic(path, image_grid_png(images, columns=6, min_cell=32))


def write_run(runs_dir: Path, key: tuple[str, str, int], run: dict, images) -> None:
    """The samples first, then the run file, whose presence marks the run done."""
    write_samples(samples_file(runs_dir, key), images)
    write_json_atomic(run_file(runs_dir, key), run)


def key_of(run: dict) -> tuple[str, str, int]:
    return run["reward"], run["method"], int(run["seed"])


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename it over `path`: a reader (or a sweep cut
    short) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json_atomic(path: Path, data) -> None:
    write_atomic(path, json.dumps(finite_or_none(data), indent=1, allow_nan=False).encode())


def read_runs(runs_dir: Path) -> dict[tuple, tuple[Path, dict]]:
    """The run files in `runs_dir`, by key, each with its path."""
    runs = {}
    for path in sorted(Path(runs_dir).glob("*__*__seed*.json")):  # not the .tmp files of a writer cut short
        try:
            run = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise SystemExit(f"{path}: not a readable run file ({error}); delete it to rerun that run") from None
        runs[key_of(run)] = (path, run)
    return runs


def settings_difference(ours: dict, theirs: dict) -> str | None:
    """The first run setting in which two runs differ, as 'name=theirs (this command: ours)'; None if none."""
    for name in RUN_SETTINGS:
        if ours.get(name) != theirs.get(name):
            return f"{name}={theirs.get(name)!r} (this command: {ours.get(name)!r})"
    return None


def existing_runs(runs_dir: Path, settings: dict) -> dict[tuple, dict]:
    """The runs already in `runs_dir`, by key; stops with a one-line error naming the setting when one
    was run with other settings (mixing them would compare different experiments)."""
    runs = {}
    for key, (path, run) in read_runs(runs_dir).items():
        difference = settings_difference(settings, run.get("settings", {}))
        if difference:
            raise SystemExit(f"{path} was run with {difference}; resume with the same settings or use another --out")
        runs[key] = run
    return runs


def runs_to_do(grid: list[tuple], existing) -> list[tuple]:
    """The runs of `grid` not on disk yet, in grid order."""
    return [key for key in grid if key not in existing]


# ------------------------------------------------------------------------------------- one run


def run_overrides(settings: dict, reward: str, method: str, seed: int) -> list[str]:
    """The overrides of one run: the shared ones, then its reward, credit mode, seed and length."""
    return settings["overrides"] + [f"rewards=[{{name: {reward}}}]", f"credit.mode={METHODS[method]}",
                                    f"run.seed={seed}", f"run.num_epochs={settings['epochs']}"]


def check_configs(settings: dict, rewards, methods) -> None:
    """Every (reward, method) config loads: a bad one stops the sweep before any run starts."""
    from dense_rl.config import ConfigError, load_config

    for reward in rewards:
        for method in methods:
            try:
                load_config(settings["config"], run_overrides(settings, reward, method, 0))
            except ConfigError as error:
                raise SystemExit(f"{reward} x {method}: {error}") from None


def execute_run(settings: dict, key: tuple[str, str, int], threads: int = 1) -> tuple[dict, object]:
    """Train and evaluate one (reward, method, seed) in this process; returns its run record and the
    final policy's held-out samples (uint8)."""
    import torch

    from dense_rl.config import RewardSpec, load_config
    from dense_rl.rewards import WeightedRewards
    from dense_rl.training.prompts import load_prompts
    from dense_rl.training.trainer import evaluate, train

    torch.set_num_threads(threads)
    reward, method, seed = key
    config = load_config(settings["config"], run_overrides(settings, reward, method, seed))
    heldout = load_prompts(settings["heldout"])[: settings["heldout_prompts"]]
    eval_rewards = WeightedRewards(config.rewards + [RewardSpec(name=settings["unseen_reward"])])
    started, load_before = time.perf_counter(), load_average()
    holder = {}  # train() leaves its final policy here, to be scored on the held-out prompts
    history = train(config, show_progress=False, keep_policy=holder)
    images = []
    scores = evaluate(holder["pipe"], config, eval_rewards, heldout, seed=settings["eval_seed"], keep_images=images)
    run = {"format": RUN_FORMAT, "reward": reward, "method": method, "credit_mode": METHODS[method], "seed": seed,
           "settings": settings}
    run.update({name: [m.get(name) for m in history] for name in PER_EPOCH if any(name in m for m in history)})
    for name in PROFILE:
        run[name] = [m.get(name) for m in history] if any(name in m for m in history) else None
    run.update({
        "heldout": {name: scores[name] for name in (reward, settings["unseen_reward"])},
        "wall_seconds": time.perf_counter() - started, "torch_threads": threads,
        "load_average_before": load_before, "load_average_after": load_average(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    return run, images[0]


def base_heldout(out: Path, settings: dict, base_config, names: list[str]) -> dict[str, float]:
    """The base model's held-out rewards (LoRA starts at zero: every run's starting point); cached
    in OUT/base_heldout.json (its samples in base_heldout.png), so a rerun with the same settings
    builds no model. Scores of other rewards already cached are kept: sweeps of different rewards
    can share one OUT."""
    path, known = out / "base_heldout.json", {}
    if path.is_file():
        cached = json.loads(path.read_text())
        if not settings_difference(settings, cached.get("settings", {})):
            known = cached["scores"]
            if set(names) <= set(known) and (out / "base_heldout.png").is_file():
                return {name: known[name] for name in names}
    from dense_rl.config import RewardSpec
    from dense_rl.diffusion.pipeline import build_policy
    from dense_rl.rewards import WeightedRewards
    from dense_rl.training.prompts import load_prompts
    from dense_rl.training.trainer import evaluate

    pipe, _ = build_policy(base_config)
    heldout = load_prompts(settings["heldout"])[: settings["heldout_prompts"]]
    images = []
    scores = evaluate(pipe, base_config, WeightedRewards([RewardSpec(name=n) for n in names]), heldout,
                      seed=settings["eval_seed"], keep_images=images)
    scores = {name: scores[name] for name in names}
    write_samples(out / "base_heldout.png", images[0])
    write_json_atomic(path, {"settings": settings, "scores": {**known, **scores}})
    return scores


# ------------------------------------------------------------------------------------- many runs


def child_argv(args) -> list[str]:
    """The arguments that make a child process compute this command's settings."""
    argv = ["--out", args.out, "--config", args.config, "--budget", str(args.budget), "--heldout", args.heldout,
            "--unseen-reward", args.unseen_reward, "--threads", str(args.threads)]
    for override in args.overrides:
        argv += ["--set", override]
    return argv + (["--quick"] if args.quick else [])


def run_in_subprocess(args, key: tuple, logs: Path) -> tuple[tuple, int, Path]:
    """One run as its own single-thread process (`--one`), its output in OUT/logs/."""
    log = logs / f"{run_name(key)}.log"
    root = str(Path(__file__).resolve().parents[2])
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    command = [sys.executable, "-m", "dense_rl.bench", "sample-efficiency", *child_argv(args),
               "--one", ",".join(map(str, key))]
    with log.open("w") as handle:
        returncode = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env).returncode
    return key, returncode, log


def run_grid(args, settings: dict, todo: list[tuple], done: int, total: int) -> list[str]:
    """Run `todo`, --jobs at a time; each run's file is written as it finishes. Returns one line per
    failed run."""
    runs_dir, failures = Path(args.out) / "runs", []
    bar = tqdm(total=total, initial=done, desc="runs (reward, method, seed)", unit="run")
    if args.jobs <= 1:
        for key in todo:
            bar.set_postfix_str(",".join(map(str, key)))
            try:
                write_run(runs_dir, key, *execute_run(settings, key, args.threads))
            except Exception as error:  # one run failing must not lose the others: report it at the end
                traceback.print_exc()
                failures.append(f"{','.join(map(str, key))}: {type(error).__name__}: {error}")
            bar.update(1)
    else:
        logs = Path(args.out) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        # Threads only wait on the child processes; each child writes its own run file.
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(run_in_subprocess, args, key, logs) for key in todo]
            for future in as_completed(futures):
                key, returncode, log = future.result()
                if returncode != 0 or not run_file(runs_dir, key).is_file():
                    tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
                    failures.append(f"{','.join(map(str, key))}: exit {returncode}, {tail[0]} (log: {log})")
                bar.update(1)
    bar.close()
    return failures
