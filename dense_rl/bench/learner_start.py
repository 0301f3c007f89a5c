"""`python -m dense_rl.bench learner-start`: what starting the learner group costs through Ray Train,
against plain Ray actors doing the same work (the regression benchmark for the group's start).

A run's start on a small machine is CPU-bound (docs/benchmarks.md), and the learner group is its
largest part. Each repeat starts a fresh private Ray instance and measures, from asking for a group
of `--ranks` ranks until every rank is ready (has imported what a learner rank imports, built the
tiny policy and done one all-reduce over gloo):

- `ray-train`: Ray Train's TorchTrainer, as dense_rl/system/roles/learner.py starts the learner group
  (its controller, the controller's helper actors, the worker group and the process group it sets up);
- `plain-actors`: as many plain Ray actors that set up torch.distributed themselves, the lighter
  alternative it is measured against.

It prints the seconds to ready, the machine's CPU-seconds spent meanwhile (everything running, the Ray
instance included, so run it on an idle machine; for ray-train until `fit()` returns, so the group's
teardown too) and the Ray worker processes started. Variants alternate, one at a time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from dense_rl.bench.common import Report, load_average, ray_workers_at_normal_priority, table

VARIANTS = ("ray-train", "plain-actors")


def rank_ready(rank: int, world_size: int) -> float:
    """A learner rank's own start (the same in both variants): imports, policy, one all-reduce of the
    time it was ready; returns the group's latest."""
    import torch
    import torch.distributed as dist

    from dense_rl.config import load_config
    from dense_rl.diffusion.pipeline import build_policy
    from dense_rl.system.roles import use_threads
    from dense_rl.training.update import make_optimizer, ppo_update  # noqa: F401 (what a learner rank imports)

    use_threads(1)
    config = load_config(None)
    pipe, params = build_policy(config)
    make_optimizer(params, config.train)
    ready = torch.tensor([time.time()], dtype=torch.float64)
    dist.all_reduce(ready, op=dist.ReduceOp.MAX)
    return float(ready)


def ray_train_loop(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch  # noqa: F401 (the learner imported it in every rank under Ray Train)

    context = ray.train.get_context()
    ready = rank_ready(context.get_world_rank(), context.get_world_size())
    if context.get_world_rank() == 0:  # Ray Train keeps reported metrics only beside a checkpoint
        with open(loop_config["ready_file"], "w") as file:
            file.write(repr(ready))


def start_ray_train(ranks: int, cpus: float) -> float:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ready_file = f"/tmp/dense_rl-learner-start/ready-{time.time_ns()}"
    os.makedirs(os.path.dirname(ready_file), exist_ok=True)
    trainer = TorchTrainer(ray_train_loop, train_loop_config={"ready_file": ready_file},
                           scaling_config=ScalingConfig(num_workers=ranks, resources_per_worker={"CPU": cpus}),
                           run_config=RunConfig(name=f"learner-start-{time.time_ns()}", storage_path="/tmp/dense_rl-learner-start"))
    trainer.fit()
    with open(ready_file) as file:
        return float(file.read())


def start_plain_actors(ranks: int, cpus: float) -> float:
    import ray

    @ray.remote
    class Rank:
        def address(self) -> str:
            """The process group's init_method: this node's Ray IP and a port free now."""
            import socket

            with socket.socket() as probe:
                probe.bind(("", 0))
                port = probe.getsockname()[1]
            return f"tcp://{ray.util.get_node_ip_address()}:{port}"

        def ready(self, rank: int, world_size: int, address: str) -> float:
            import torch.distributed as dist

            dist.init_process_group("gloo", init_method=address, rank=rank, world_size=world_size)
            try:
                return rank_ready(rank, world_size)
            finally:
                dist.destroy_process_group()

    group = [Rank.options(num_cpus=cpus).remote() for _ in range(ranks)]
    address = ray.get(group[0].address.remote())
    return max(ray.get([member.ready.remote(rank, ranks, address) for rank, member in enumerate(group)]))


class WorkerWatch:
    """The Ray worker processes seen while a group starts (polled; Ray names them `ray::<actor class>`
    once they run an actor or task, `ray::IDLE` before)."""

    def __init__(self, poll_seconds: float = 0.2):
        import threading

        self.seen: dict[int, str] = {}
        self.stopped = threading.Event()
        self.poll_seconds = poll_seconds
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        import psutil

        while not self.stopped.wait(self.poll_seconds):
            for process in psutil.process_iter(["pid", "cmdline"]):
                command = " ".join(process.info["cmdline"] or [])
                if command.startswith("ray::") or "default_worker.py" in command:
                    name = command.split()[0] if command.startswith("ray::") else "ray::IDLE"
                    if name != "ray::IDLE" or process.info["pid"] not in self.seen:
                        self.seen[process.info["pid"]] = name

    def stop(self) -> dict[int, str]:
        self.stopped.set()
        self.thread.join()
        return self.seen


def measure(variant: str, ranks: int, settle_seconds: float) -> dict:
    import psutil
    import ray

    from dense_rl.system.roles.learner import enable_train_view
    from dense_rl.system.session import without_preemption_watcher

    cores = os.cpu_count() or 1
    without_preemption_watcher()  # as a run's private instance has it, and its learner group
    enable_train_view()
    ray.init(num_cpus=cores, logging_level="ERROR", log_to_driver=False)
    try:
        time.sleep(settle_seconds)  # the dashboard and its agents finish starting
        cpu_before, asked, watch = sum(psutil.cpu_times()[:3]), time.time(), WorkerWatch()
        start = start_ray_train if variant == "ray-train" else start_plain_actors
        ready = start(ranks, cores / ranks)
        cpu_seconds = sum(psutil.cpu_times()[:3]) - cpu_before
        workers = watch.stop()
        return {"variant": variant, "seconds_to_ready": ready - asked, "cpu_seconds": cpu_seconds,
                "ray_worker_processes": len(workers), "worker_names": sorted(workers.values())}
    finally:
        ray.shutdown()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m dense_rl.bench learner-start", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2, help="learner ranks (default %(default)s: the 2-core layout's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--settle-seconds", type=float, default=5.0)
    parser.add_argument("--out", default="runs/bench/learner-start")
    args = parser.parse_args(argv)
    if args.ranks < 1 or args.repeats < 1:
        parser.error("--ranks and --repeats must be >= 1")
    ray_workers_at_normal_priority()
    report = Report("learner-start", args.out, {"ranks": args.ranks, "repeats": args.repeats, "settle_seconds": args.settle_seconds})
    rows = []
    for repeat in range(args.repeats):
        for variant in VARIANTS:
            row = measure(variant, args.ranks, args.settle_seconds) | {"repeat": repeat, "load_average": load_average()}
            print(f"repeat {repeat + 1}/{args.repeats} {variant:>12}: ready after {row['seconds_to_ready']:5.1f} s, "
                  f"{row['cpu_seconds']:5.1f} CPU-s, {row['ray_worker_processes']} Ray worker processes", file=sys.stderr)
            rows.append(row)
            report["rows"] = rows
    keys = ("seconds_to_ready", "cpu_seconds", "ray_worker_processes")
    medians = {variant: {key: statistics.median(row[key] for row in rows if row["variant"] == variant) for key in keys}
               for variant in VARIANTS}
    report["medians"] = medians
    print(table([(variant, *medians[variant].values()) for variant in VARIANTS],
                ("variant", "s to ready", "CPU-s", "Ray worker processes")))
    for variant in VARIANTS:
        print(f"{variant}: {', '.join(rows[VARIANTS.index(variant)]['worker_names'])}")
    extra = {key: medians["ray-train"][key] - medians["plain-actors"][key] for key in keys[:2]}
    print(f"medians of {args.repeats}: Ray Train's group of {args.ranks} ranks is ready {extra['seconds_to_ready']:.1f} s later "
          f"and costs {extra['cpu_seconds']:.1f} CPU-s more; results in {report.finish()}")
    return 0
