"""Time to reward against TRL: wall-clock seconds for dense_rl to reach the reward TRL's DDPOTrainer
has after its budget of epochs, on the peer workload (../shared/peer/README.md: the tiny SD-shaped
pipeline, 32 samples an epoch, 20 DDIM steps, one PPO pass, LoRA r4, 2 CPUs).

TRL (trl_ddpo_run.py, in the TRL venv) runs `--trl-epochs` epochs; its target is the mean reward of
its last two epochs (64 samples). Each repeat pairs one TRL run with one run of each dense_rl setup,
right after it, against that TRL run's target. Each dense_rl setup is the Ray system as
`dense_rl.launch` runs it (sync mode, the default layout on 2 CPUs, started inside the timing),
stopped at the first epoch where the same two-epoch mean reaches the target, or after
`--budget-factor` times TRL's epochs. Setups:

    sparse   TRL's method (sparse credit, per-epoch advantages): any gap is the system, not the method
    coca     the same with CoCA's dense credit (`credit.mode=coca`)

Everything trains `--reward` (default brightness) at `--lr` (default 3e-3, the value the credit
comparison chose for DDPO, UCA and CoCA on the tiny model) and `--clip-range` (default the
workload's 1e-4). The peer's own JPEG compressibility at lr 3e-4 does not move TRL's reward in 8
epochs, even at 3e-3 (docs/benchmarks.md), so it gives no target worth reaching.

Every setup runs `--repeats` times, interleaved with TRL, one at a time; the speed-up is TRL's
seconds over dense_rl's, per repeat, then the median.

    .venv/bin/python ../shared/peer/make_tiny_sd.py /tmp/tiny_sd
    python -m dense_rl.bench time-to-reward --model /tmp/tiny_sd --trl-python /tmp/trlvenv/bin/python
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from tqdm.auto import tqdm

from dense_rl.bench.common import Report, load_average, ray_workers_at_normal_priority, table
from dense_rl.bench.peer import QUICK, WORKLOAD, peer_script, ray_system

SETUPS = {"sparse": [], "coca": ["credit.mode=coca"]}
SMOOTHING = 2  # epochs in the running mean both sides are read with


def running_mean(rewards: list[float], width: int = SMOOTHING) -> list[float]:
    """The mean of each epoch's reward and the width-1 before it (fewer at the start)."""
    return [statistics.mean(rewards[max(0, k - width + 1):k + 1]) for k in range(len(rewards))]


def target_of(trl_run: dict) -> float:
    """TRL's reward after its budget: the two-epoch mean at its last epoch."""
    return running_mean(trl_run["reward_mean"])[-1]


def seconds_to_reach(run: dict, target: float) -> tuple[float | None, int | None]:
    """Wall seconds from a run's start to the end of its first epoch whose two-epoch mean reward is at
    least `target`, and that epoch; (None, None) if it never got there."""
    for epoch, value in enumerate(running_mean(run["reward_mean"])):
        if epoch >= SMOOTHING - 1 and value >= target:
            return run["epoch_end_seconds"][epoch], epoch
    return None, None


def reaches(target: float):
    """A stop rule for ray_system: stop once the two-epoch mean reward reaches the target."""
    return lambda rewards: len(rewards) >= SMOOTHING and running_mean(rewards)[-1] >= target


def summarise(runs: dict[str, list[dict]], targets: list[float]) -> dict:
    """Per setup and repeat, the seconds to reach that repeat's target and TRL's seconds over them."""
    trl = runs.get("trl", [])
    per_setup = {}
    for setup, repeats in runs.items():
        reached = [seconds_to_reach(run, target) for run, target in zip(repeats, targets)]
        seconds = [s for s, _ in reached]
        entry = {"seconds": seconds, "epochs": [e for _, e in reached], "repeats": len(repeats),
                 "median_seconds": statistics.median(seconds) if None not in seconds else None,
                 "steady_epoch_seconds": statistics.median(run["steady_epoch_seconds"] for run in repeats)}
        if trl and setup != "trl":  # TRL's seconds by the same rule: it may reach its final reward before the end
            trl_seconds = [seconds_to_reach(run, target)[0] for run, target in zip(trl, targets)]
            speedups = [t / s if s else None for t, s in zip(trl_seconds, seconds)]
            entry["speedup_over_trl"] = speedups
            entry["median_speedup_over_trl"] = statistics.median(speedups) if None not in speedups else None
        per_setup[setup] = entry
    return {"targets": targets, "setups": per_setup}


def print_summary(summary: dict) -> None:
    rows = []
    for setup, entry in summary["setups"].items():
        epochs = ", ".join("never" if e is None else str(e + 1) for e in entry["epochs"])
        rows.append((setup, entry["median_seconds"], epochs, entry["steady_epoch_seconds"],
                     entry.get("median_speedup_over_trl"), entry["repeats"]))
    targets = ", ".join(f"{t:.4f}" for t in summary["targets"])
    print(f"targets, per repeat: {targets} (TRL's mean reward over its last {SMOOTHING} epochs, or --target)")
    print(table(rows, ("setup", "seconds to target (median)", "epochs needed (each repeat)", "steady epoch s",
                       "TRL seconds / these seconds (median)", "repeats")))


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m dense_rl.bench time-to-reward",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a local diffusers folder with prompts.txt, e.g. what "
                        "../shared/peer/make_tiny_sd.py builds")
    parser.add_argument("--trl-python", help="the python of the TRL venv (../shared/peer/README.md)")
    parser.add_argument("--reward", default="brightness", choices=("brightness", "jpeg_compressibility"))
    parser.add_argument("--clip-range", type=float, default=1e-4, help="PPO's clip range for every run (the "
                        "peer workload's 1e-4, DDPO's; the tiny presets use 1e-3)")
    parser.add_argument("--target", type=float, help="a reward to reach instead of TRL's (then TRL does not run)")
    parser.add_argument("--out", default="runs/bench/time-to-reward")
    parser.add_argument("--config", default="configs/sd15-jpeg.yaml")
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated, of {', '.join(SETUPS)}")
    parser.add_argument("--trl-epochs", type=int, default=8, help="TRL's budget")
    parser.add_argument("--lr", type=float, default=3e-3, help="the learning rate of TRL and of every dense_rl "
                        "setup (the credit comparison's tuned value; the peer workload's 3e-4 barely moves the reward "
                        "in 8 epochs)")
    parser.add_argument("--budget-factor", type=float, default=1.5, help="dense_rl's most epochs, times TRL's")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--quick", action="store_true", help="4 steps, 8 samples an epoch, one repeat: for CI")
    args = parser.parse_args(argv)
    args.setups = [s for s in args.setups.split(",") if s]
    unknown = [s for s in args.setups if s not in SETUPS]
    if unknown:
        parser.error(f"--setups: unknown {', '.join(unknown)}; choose from {', '.join(SETUPS)}")
    if args.target is None and not args.trl_python:
        parser.error("give --trl-python (TRL sets the target), or --target REWARD")
    if not (Path(args.model) / "model_index.json").is_file() or not (Path(args.model) / "prompts.txt").is_file():
        parser.error(f"--model {args.model}: needs model_index.json and prompts.txt; build one with "
                     "../shared/peer/make_tiny_sd.py")
    if args.trl_epochs < SMOOTHING:
        parser.error(f"--trl-epochs must be at least {SMOOTHING} (the target is a {SMOOTHING}-epoch mean)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from dense_rl.config import ConfigError, load_config

    ray_workers_at_normal_priority()
    repeats = 1 if args.quick else args.repeats
    budget = max(SMOOTHING, round(args.trl_epochs * args.budget_factor))
    model = str(Path(args.model).resolve())
    overrides = WORKLOAD + (QUICK + ["credit.window_size=2"] if args.quick else []) + [
        f"model.pretrained={model}", f"sample.prompts={model}/prompts.txt", f"run.num_epochs={budget}",
        f"run.save_every={budget}", f"train.lr={args.lr:g}", f"train.clip_range={args.clip_range:g}",
        f"rewards=[{{name: {args.reward}}}]"] + args.overrides
    configs = {setup: (lambda setup=setup: load_config(args.config, overrides + SETUPS[setup])) for setup in args.setups}
    try:
        for make in configs.values():
            make()  # a bad override stops here, before anything runs
    except ConfigError as error:
        raise SystemExit(f"error: {error}") from None
    with_trl = args.target is None
    report = Report("time-to-reward", args.out, {
        "model": model, "config": args.config, "overrides": overrides, "setups": args.setups,
        "trl_epochs": args.trl_epochs if with_trl else None, "lr": args.lr, "clip_range": args.clip_range,
        "reward": args.reward, "budget_epochs": budget, "repeats": repeats,
        "smoothing_epochs": SMOOTHING, "given_target": args.target, "quick": args.quick})
    order = (["trl"] if with_trl else []) + args.setups
    runs: dict[str, list[dict]] = {setup: [] for setup in order}
    targets: list[float] = [] if with_trl else [args.target] * repeats  # TRL's runs append theirs
    bar = tqdm(total=repeats * len(order), desc="time-to-reward", unit="run")
    for repeat in range(repeats):
        for setup in order:
            bar.set_postfix_str(f"{setup}, repeat {repeat + 1}")
            before = load_average()
            if setup == "trl":
                result = peer_script(args.trl_python, Path(__file__).with_name("trl_ddpo_run.py"), model,
                                     args.trl_epochs, extra=[f"{args.lr:g}", args.reward, f"{args.clip_range:g}"])
                targets.append(target_of(result))
            else:
                result = ray_system(configs[setup](), stop_when=reaches(targets[repeat]))
            runs[setup].append({**result, "load_average_before": before, "load_average_after": load_average()})
            report["runs"] = runs
            bar.update(1)
    bar.close()
    summary = summarise(runs, targets)
    report["summary"] = summary
    report.finish()
    print_summary(summary)
    print(f"load average at start {report['load_average_start']}, now {load_average()} (on {os.cpu_count()} cores)")
    print(f"wrote {report.out / 'results.json'}")
    return 0
