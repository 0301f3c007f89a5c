"""The peer workload (../shared/peer/README.md) on any local diffusers folder: dense_rl's in-process
loop, the Ray system in sync mode and in async mode, and optionally the peer's own scripts (the
plain-PyTorch floor, TRL's DDPOTrainer), interleaved, one at a time, the same number of repeats each.

Per epoch: 32 trajectories in 4 batches of 8, 20 DDIM steps (eta 1, CFG 5), JPEG compressibility,
one PPO pass in batches of 8 (clip range 1e-4, lr 3e-4, weight decay 1e-4, grad-norm clip 1), LoRA
rank 4 on the attention projections, float32, 2 CPU threads in all (the in-process loop's torch
threads; the Ray system's default layout on the 2 CPUs it is given). Trajectories per second are the
samples of an epoch over the mean wall time of epochs 2..N, as the peer scripts count them.
`--setups in-process-compile` adds the in-process loop with `model.compile: true` (its first epoch
pays the compilation).

    .venv/bin/python ../shared/peer/make_tiny_sd.py /tmp/tiny_sd
    python -m dense_rl.bench peer --model /tmp/tiny_sd
    python -m dense_rl.bench peer --model /tmp/tiny_sd --peer-dir ../shared/peer --trl-python /tmp/trlvenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm.auto import tqdm

from dense_rl.bench.common import Report, load_average, ray_workers_at_normal_priority, table

CPUS = 2
# The workload on top of configs/sd15-jpeg.yaml (already: eta 1, CFG 5, LoRA r4/alpha 4 on
# to_q/k/v/out, clip range 1e-4, advantage clip 5, grad-norm clip 1, one inner epoch).
WORKLOAD = [
    "model.dtype=float32", "model.device=cpu", "sample.num_steps=20", "sample.batch_size=8",
    "sample.num_batches_per_epoch=4", "sample.samples_per_prompt=1", "credit.mode=sparse", "train.batch_size=8",
    "train.lr=3e-4", "train.adam_weight_decay=1e-4",
    # The default layout, chosen from the CPUs Ray reports (dense_rl/config/layout.py), not the preset's GPU node.
    "cluster.num_rollout_workers=null", "cluster.rollout_cpus=null", "cluster.rollout_gpus=0",
    "cluster.reward_cpus=null", "cluster.num_learner_workers=null", "cluster.learner_cpus=null",
    "cluster.learner_gpus=0",
]
QUICK = ["sample.num_steps=4", "sample.batch_size=4", "sample.num_batches_per_epoch=2", "train.batch_size=4"]
DENSE_RL_SETUPS = ("in-process", "ray-sync", "ray-async", "in-process-compile")
DEFAULT_SETUPS = ("in-process", "ray-sync", "ray-async")  # compile is opt-in: minutes of compilation on CPU
PEER_SETUPS = {"floor": "floor_bench.py", "trl": "trl_ddpo_bench.py"}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m dense_rl.bench peer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a local diffusers folder (StableDiffusionPipeline layout) "
                        "with prompts.txt beside model_index.json, e.g. what ../shared/peer/make_tiny_sd.py builds")
    parser.add_argument("--out", default="runs/bench/peer")
    parser.add_argument("--config", default="configs/sd15-jpeg.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per setup (the first is warm-up)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats of every setup")
    parser.add_argument("--setups", default=",".join(DEFAULT_SETUPS),
                        help=f"comma-separated, of {', '.join(DENSE_RL_SETUPS)} (and floor, trl with --peer-dir)")
    parser.add_argument("--peer-dir", help="../shared/peer: adds its floor_bench.py (and trl_ddpo_bench.py "
                        "with --trl-python) to the setups")
    parser.add_argument("--trl-python", help="the python of the TRL venv (../shared/peer/README.md)")
    parser.add_argument("--quick", action="store_true", help="2 epochs of 8 samples, 4 steps, one repeat: for CI")
    args = parser.parse_args(argv)
    args.setups = [s for s in args.setups.split(",") if s]
    if args.peer_dir:
        args.setups += ["floor"] + (["trl"] if args.trl_python else [])
    unknown = [s for s in args.setups if s not in DENSE_RL_SETUPS and s not in PEER_SETUPS]
    if unknown:
        parser.error(f"--setups: unknown {', '.join(unknown)}; choose from {', '.join(DENSE_RL_SETUPS)}")
    if any(s in PEER_SETUPS for s in args.setups) and not args.peer_dir:
        parser.error("--setups floor/trl need --peer-dir (the folder with floor_bench.py and trl_ddpo_bench.py)")
    if not (Path(args.model) / "model_index.json").is_file():
        parser.error(f"--model {args.model}: no model_index.json there; build one with ../shared/peer/make_tiny_sd.py")
    if not (Path(args.model) / "prompts.txt").is_file():
        parser.error(f"--model {args.model}: no prompts.txt beside model_index.json (the workload's prompts)")
    return args


# ---------------------------------------------------------------------------------------- setups


def epoch_summary(epoch_seconds: list[float], first_epoch_end: float, sample: list[float], learn: list[float],
                  reward_mean: list[float], samples_per_epoch: int) -> dict:
    """One setup's run: trajectories/s as the peer scripts count them (epochs 2..N), the time from
    its start to its first epoch's end, and the per-epoch sample/learn split."""
    steady = epoch_seconds[1:] or epoch_seconds
    ends = [first_epoch_end + sum(epoch_seconds[1:k + 1]) for k in range(len(epoch_seconds))]
    return {"epoch_seconds": epoch_seconds, "epoch_end_seconds": ends, "trajectories_per_second": samples_per_epoch / statistics.mean(steady),
            "first_epoch_end_seconds": first_epoch_end, "steady_epoch_seconds": statistics.mean(steady),
            "sample_seconds": sample, "learn_seconds": learn, "reward_mean": reward_mean}


def in_process(config) -> dict:
    import torch

    from dense_rl.training.trainer import train

    torch.set_num_threads(CPUS)
    started = time.perf_counter()
    history = train(config, show_progress=False)
    wall = time.perf_counter() - started
    epochs = [m["epoch_seconds"] for m in history]
    return epoch_summary(epochs, wall - sum(epochs[1:]), [m["seconds_sample"] + m["seconds_score"] for m in history],
                         [m["seconds_advantages"] + m["seconds_update"] for m in history],
                         [m["reward_mean"] for m in history], config.samples_per_epoch)


def ray_system(config, stop_when=None) -> dict:
    """A private Ray instance of CPUS CPUs, whatever the machine has, started inside the timing as
    dense_rl.launch starts one; epoch times are the wall time between epoch ends (in async mode
    sampling overlaps the update, so only that counts throughput). `stop_when(rewards)`, given the
    epochs' mean rewards so far, ends the run early when it returns true."""
    import logging

    import ray

    from dense_rl.system.session import run_system

    started, ends, rewards = time.perf_counter(), [], []

    def on_epoch(driver, metrics):
        ends.append(time.perf_counter())
        rewards.append(metrics["reward_mean"])
        if stop_when is not None and stop_when(rewards):
            driver.stopped_by = "reached the target reward"

    ray.init(address="local", num_cpus=CPUS, logging_level=logging.ERROR, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as folder:
            config.run.output_dir, config.run.name = folder, "peer"
            history = run_system(config, f"{folder}/peer", show_progress=False, on_epoch=on_epoch)
    finally:
        ray.shutdown()
    epochs = [ends[0] - started] + [b - a for a, b in zip(ends, ends[1:])]
    return epoch_summary(epochs, ends[0] - started, [m["seconds_sample_and_score"] for m in history],
                         [m["seconds_learn_and_sync"] for m in history], [m["reward_mean"] for m in history],
                         config.samples_per_epoch)


def parse_peer_output(lines: list[tuple[float, str]], started: float) -> dict:
    """A peer script's output, each line with the time it was read: its last JSON line is its result
    (epoch_s, sample_s_per_epoch, ...); its first "epoch 0:" line marks the first epoch's end (progress
    bars of the libraries it runs may share that line)."""
    result = json.loads(next(line for _, line in reversed(lines) if line.startswith("{")))
    first = next(at for at, line in lines if "epoch 0:" in line)
    epochs = [float(s) for s in result["epoch_s"]]
    count = len(epochs)
    learn = result["train_s_per_epoch"] + result.get("other_s_per_epoch", 0.0)
    return epoch_summary(epochs, first - started, [result["sample_s_per_epoch"] + result["reward_s_per_epoch"]] * count,
                         [learn] * count, result.get("reward_mean_per_epoch", []), result["samples_per_epoch"])


def peer_script(python: str, script: Path, model: str, epochs: int, extra: list[str] = ()) -> dict:
    """Runs a script of the peers' kind: `script MODEL EPOCHS [extra...]`, "epoch K:" lines, one JSON last."""
    started, lines = time.perf_counter(), []
    process = subprocess.Popen([python, str(script), model, str(epochs), *extra], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        lines.append((time.perf_counter(), line.strip()))
    if process.wait() != 0 or not lines:
        tail = "\n".join(line for _, line in lines[-5:])
        raise RuntimeError(f"{script.name} exited with {process.returncode}:\n{tail}")
    return parse_peer_output(lines, started)


# ---------------------------------------------------------------------------------------- report


def summarise(runs: dict[str, list[dict]]) -> dict:
    """Per setup, the median over repeats of each measure; ratios between the setups present."""
    per_setup = {}
    for setup, repeats in runs.items():
        per_setup[setup] = {name: statistics.median(r[name] for r in repeats)
                            for name in ("trajectories_per_second", "first_epoch_end_seconds", "steady_epoch_seconds")}
        for name in ("sample_seconds", "learn_seconds"):  # steady epochs only, like the rate
            per_setup[setup][name] = statistics.median(s for r in repeats for s in r[name][1:] or r[name])
        per_setup[setup]["repeats"] = len(repeats)
    rate = {setup: entry["trajectories_per_second"] for setup, entry in per_setup.items()}
    ratios = {}
    for numerator, denominator in (("ray-sync", "in-process"), ("ray-async", "ray-sync"), ("in-process", "floor"),
                                   ("in-process-compile", "in-process"),
                                   ("in-process", "trl"), ("ray-sync", "trl"), ("floor", "trl")):
        if numerator in rate and denominator in rate:
            ratios[f"{numerator} / {denominator}"] = rate[numerator] / rate[denominator]
    return {"setups": per_setup, "ratios": ratios}


def print_summary(summary: dict) -> None:
    rows = [(setup, e["trajectories_per_second"], e["first_epoch_end_seconds"],
             e["first_epoch_end_seconds"] - e["steady_epoch_seconds"], e["sample_seconds"], e["learn_seconds"], e["repeats"])
            for setup, e in summary["setups"].items()]
    print(table(rows, ("setup", "trajectories/s", "first epoch ends after s", "start-up over a steady epoch s",
                       "sample+score s/epoch", "learn s/epoch", "repeats")))
    print(table(list(summary["ratios"].items()), ("trajectories/s, side by side", "ratio")))


def main(argv=None) -> int:
    args = parse_args(argv)
    from dense_rl.config import load_config

    ray_workers_at_normal_priority()
    epochs = 2 if args.quick else args.epochs
    repeats = 1 if args.quick else args.repeats
    model = str(Path(args.model).resolve())
    overrides = WORKLOAD + (QUICK if args.quick else []) + [
        f"model.pretrained={model}", f"sample.prompts={model}/prompts.txt", f"run.num_epochs={epochs}",
        f"run.save_every={epochs}"] + args.overrides

    def config_for(setup):
        extra = {"ray-async": ["cluster.max_policy_lag=1"], "in-process-compile": ["model.compile=true"]}
        return load_config(args.config, overrides + extra.get(setup, []))

    config_for("ray-sync")  # a bad override stops here, before anything runs
    report = Report("peer", args.out, {"model": model, "config": args.config, "overrides": overrides, "epochs": epochs,
                                       "repeats": repeats, "setups": args.setups, "cpus": CPUS, "quick": args.quick})
    runs: dict[str, list[dict]] = {setup: [] for setup in args.setups}
    bar = tqdm(total=repeats * len(args.setups), desc="peer", unit="run")
    for repeat in range(repeats):  # interleaved: every setup once, then again
        for setup in args.setups:
            bar.set_postfix_str(f"{setup}, repeat {repeat + 1}")
            before = load_average()
            if setup in ("in-process", "in-process-compile"):
                result = in_process(config_for(setup))
            elif setup in ("ray-sync", "ray-async"):
                result = ray_system(config_for(setup))
            else:
                python = args.trl_python if setup == "trl" else sys.executable
                result = peer_script(python, Path(args.peer_dir) / PEER_SETUPS[setup], model, epochs)
            runs[setup].append({**result, "load_average_before": before, "load_average_after": load_average()})
            report["runs"] = runs
            bar.update(1)
    bar.close()
    summary = summarise(runs)
    report["summary"] = summary
    report.finish()
    print_summary(summary)
    print(f"load average at start {report['load_average_start']}, now {load_average()} (on {os.cpu_count()} cores)")
    print(f"wrote {report.out / 'results.json'}")
    return 0
