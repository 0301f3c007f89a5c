"""Throughput against the number of rollout actors, on the local multi-node cluster
(cluster/local_cluster.py: a head, a "rollout" node and a "learner" node on this machine), and the cost
model it implies for N GPUs.

For each N the Ray system trains a few epochs in sync mode with N rollout actors on the rollout node.
An epoch's time splits into what the driver records: sample + score (rollouts in parallel, then the
reward actor) and learn + sync (PPO, then the weight broadcast). Fitting sample+score = a / N + b over
the measured N gives the model

    T(N) = a / N + b + c        throughput(N) = samples_per_epoch / T(N)

with a the rollout work that N actors share, b what does not shrink with N (reward scoring, the
slowest batch's tail, scheduling) and c the learner's update and the broadcast; its limit as N grows
is samples_per_epoch / (b + c).

    python -m dense_rl.bench scaling                # N = 1, 2 (the rollout node has 2 slots), 4 epochs each
    python -m dense_rl.bench scaling --quick        # a small version for CI
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from dense_rl.bench.common import Report, load_average, pyplot, ray_workers_at_normal_priority, table

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = REPO / "cluster" / "local_cluster.py"
QUICK = ["sample.num_steps=10", "sample.batch_size=4"]
PREDICT_FOR = [1, 2, 4, 8, 16, 32, 64]


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m dense_rl.bench scaling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench/scaling")
    parser.add_argument("--config", default=str(REPO / "cluster" / "local_multinode.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--actors", default="1,2", help="rollout actor counts to measure (the rollout node has 2 slots)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per count (the first is warm-up)")
    parser.add_argument("--quick", action="store_true", help="2 epochs of 2 x 4 samples, 10 steps: for CI")
    return parser.parse_args(argv)


class LocalCluster:
    """cluster/local_cluster.py up/down in a private temp dir on free ports, so it cannot collide with
    another cluster on this machine (and `down` stops only this one)."""

    def __init__(self):
        from cluster.local_cluster import free_port  # noqa: the script is importable from the repo root

        self.temp_dir = Path("/tmp") / f"rl-bench-{os.getpid()}"  # short: Ray's socket paths must fit 107 bytes
        self.port, self.dashboard_port = free_port(), free_port()

    def __enter__(self) -> str:
        os.environ["RAY_AUTH_MODE"] = "disabled"  # the script's cluster listens on loopback, no tokens
        subprocess.run([sys.executable, CLUSTER_SCRIPT, "up", "--temp-dir", self.temp_dir, "--port", str(self.port),
                        "--dashboard-port", str(self.dashboard_port)], check=True, capture_output=True, timeout=900)
        return json.loads((self.temp_dir / "local_cluster.json").read_text())["address"]

    def __exit__(self, *exc) -> None:
        subprocess.run([sys.executable, CLUSTER_SCRIPT, "down", "--temp-dir", self.temp_dir], capture_output=True, timeout=300)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def measure(config) -> dict:
    from dense_rl.system.session import run_system

    ends = []
    with tempfile.TemporaryDirectory() as folder:
        config.run.output_dir = folder
        history = run_system(config, f"{folder}/{config.run.name}", show_progress=False,
                             on_epoch=lambda driver, metrics: ends.append(time.perf_counter()))
    return steady_timings(history, ends, config.samples_per_epoch)


def steady_timings(history: list[dict], ends: list[float], samples_per_epoch: int) -> dict:
    """Per-epoch times from the driver's metrics and the epoch-end clock, and their steady medians."""
    steady = slice(1, None) if len(history) > 1 else slice(None)  # the first epoch includes actor start-up
    result = {key: [m[key] for m in history] for key in ("epoch_seconds", "seconds_sample_and_score", "seconds_learn_and_sync")}
    result["between_epoch_ends"] = [b - a for a, b in zip(ends, ends[1:])]
    result["sample_and_score"] = statistics.median(result["seconds_sample_and_score"][steady])
    result["learn_and_sync"] = statistics.median(result["seconds_learn_and_sync"][steady])
    wall = result["between_epoch_ends"] or result["epoch_seconds"][steady]
    result["steady_epoch_seconds"] = statistics.median(wall)
    result["trajectories_per_second"] = samples_per_epoch / result["steady_epoch_seconds"]
    return result


def cost_model(actors: list[int], measured: dict, samples_per_epoch: int) -> dict:
    """Least squares of sample+score = a / N + b over the measured N; c = median learn+sync. Negative
    fitted terms (rollouts that did not speed up because they share the same cores) are clipped to 0."""
    inverse = np.array([1.0 / n for n in actors])
    y = np.array([measured[n]["sample_and_score"] for n in actors])
    if len(actors) >= 2:
        a, b = np.linalg.lstsq(np.stack([inverse, np.ones_like(inverse)], axis=1), y, rcond=None)[0]
    else:
        a, b = y[0], 0.0
    a, b = max(float(a), 0.0), max(float(b), 0.0)
    c = float(statistics.median(measured[n]["learn_and_sync"] for n in actors))
    predicted = {n: samples_per_epoch / (a / n + b + c) for n in PREDICT_FOR}
    return {"a_rollout_seconds": a, "b_fixed_sample_seconds": b, "c_learn_and_sync_seconds": c,
            "samples_per_epoch": samples_per_epoch, "predicted_trajectories_per_second": predicted,
            "limit_trajectories_per_second": samples_per_epoch / (b + c) if b + c > 0 else None,
            "half_of_limit_at_n": a / (b + c) if b + c > 0 else None}


def plot(actors, measured, model, path) -> None:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 4), dpi=110)
    axis.plot(actors, [measured[n]["trajectories_per_second"] for n in actors], "o-", color="tab:red",
              label="measured (this machine)")
    xs = PREDICT_FOR
    axis.plot(xs, [model["predicted_trajectories_per_second"][n] for n in xs], "--", color="tab:gray",
              label="cost model T(N) = a/N + b + c")
    if model["limit_trajectories_per_second"]:
        axis.axhline(model["limit_trajectories_per_second"], color="k", linestyle=":", linewidth=1, label="limit S / (b + c)")
    ideal = measured[actors[0]]["trajectories_per_second"]
    axis.plot(xs, [ideal * n / actors[0] for n in xs], ":", color="tab:blue", alpha=0.5, label="linear")
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_ylim(top=max(model["predicted_trajectories_per_second"].values()) * 3)
    axis.set_xlabel("rollout actors N (one device each in the model)")
    axis.set_ylabel("trajectories / second")
    axis.set_title("throughput vs rollout actors (sync mode)")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(argv=None) -> int:
    args = parse_args(argv)
    from dense_rl.config import load_config

    ray_workers_at_normal_priority()
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    actors = [int(n) for n in args.actors.split(",")]
    epochs = 2 if args.quick else args.epochs
    overrides = (QUICK if args.quick else []) + args.overrides + [
        f"run.num_epochs={epochs}", f"run.save_every={epochs}", f"sample.num_batches_per_epoch={max(actors)}"]
    report = Report("scaling", args.out, {"config": args.config, "overrides": overrides, "actors": actors,
                                          "epochs": epochs, "quick": args.quick})
    measured = {}
    bar = tqdm(total=len(actors) + 1, desc="scaling", unit="step")
    bar.set_postfix_str("cluster up")
    with LocalCluster() as address:
        bar.update(1)
        for n in actors:
            bar.set_postfix_str(f"{n} rollout actors")
            config = load_config(args.config, overrides + [f"cluster.address={address}", f"cluster.num_rollout_workers={n}",
                                                           f"run.name=scale-{n}"])
            before = load_average()
            measured[n] = measure(config)
            measured[n]["load_average"] = {"before": before, "after": load_average()}
            report["measured"] = {str(k): v for k, v in measured.items()}
            bar.update(1)
    bar.close()
    finish(report, actors, measured, config.samples_per_epoch)
    return 0


def finish(report: Report, actors: list[int], measured: dict, samples: int) -> dict:
    """Cost model, speed-ups, plot, cost_model.md and printed table from the measured counts; returns the model."""
    report["measured"] = {str(k): v for k, v in measured.items()}
    model = cost_model(actors, measured, samples)
    report["cost_model"] = model
    report["speedup"] = {str(n): measured[n]["trajectories_per_second"] / measured[actors[0]]["trajectories_per_second"]
                         for n in actors}
    plot(actors, measured, model, report.out / "scaling.png")
    (report.out / "cost_model.md").write_text(cost_model_text(model, actors, measured))
    report.finish()

    rows = [(n, measured[n]["trajectories_per_second"], report["speedup"][str(n)], measured[n]["sample_and_score"],
             measured[n]["learn_and_sync"], measured[n]["steady_epoch_seconds"]) for n in actors]
    print(table(rows, ("rollout actors", "traj/s", "speedup vs first", "sample+score s", "learn+sync s", "epoch s")))
    print()
    print(cost_model_text(model, actors, measured))
    print(f"wrote {report.out / 'results.json'}, {report.out / 'scaling.png'} and {report.out / 'cost_model.md'}")
    return model


def cost_model_text(model: dict, actors, measured) -> str:
    rows = [(n, model["predicted_trajectories_per_second"][n]) for n in PREDICT_FOR]
    limit = model["limit_trajectories_per_second"]
    return "\n".join([
        "Cost model (sync mode, one device per rollout actor):",
        f"  T(N) = a/N + b + c with a = {model['a_rollout_seconds']:.3f} s (rollouts, shared by N actors), "
        f"b = {model['b_fixed_sample_seconds']:.3f} s (scoring and the sampling stage's fixed part), "
        f"c = {model['c_learn_and_sync_seconds']:.3f} s (PPO update + weight broadcast), "
        f"{model['samples_per_epoch']} samples per epoch",
        f"  limit as N grows: {limit:.3f} trajectories/s" if limit else "  limit: unbounded (b + c = 0)",
        "",
        table(rows, ("N", "predicted traj/s")),
        "",
        f"Measured on {os.cpu_count()} cores shared by every node, so N actors here do not get N devices; "
        "the fit reads what they did get.",
    ]) + "\n"
