"""Throughput, every ratio measured side by side in one run on one machine:

1. the cost of credit assignment: epoch time with CoCA vs sparse credit (in-process loop), and the
   credit computation itself timed on a real epoch's trajectories;
2. system overhead: the Ray system vs the in-process reference loop doing identical work (same
   model, batch, steps, seeds and thread count; trajectories per second);
3. async vs sync: the Ray system with max_policy_lag 1 vs 0, rollout and learner one thread each;
4. weight broadcast latency (ray.put once, set_weights on every rollout actor) and its share of an
   epoch, for the tiny LoRA and for an SD 1.5-sized LoRA (rank 4, SD 1.5's shapes, random values);
5. object-store bytes per trajectory and what dominates them.

Every stage runs single-threaded (torch threads = 1, each Ray actor 1 CPU), so the in-process loop and
the Ray roles do the same arithmetic the same way and only the system around it differs.

    python -m dense_rl.bench throughput            # tiny preset, 4 epochs per configuration
    python -m dense_rl.bench throughput --quick    # a small version for CI
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import tempfile
import time

import torch
from tqdm.auto import tqdm

from dense_rl.bench.common import Report, load_average, pyplot, ray_workers_at_normal_priority, table

QUICK = ["sample.num_steps=10", "sample.batch_size=8", "sample.num_batches_per_epoch=1", "train.batch_size=8"]
# One actor of each role, one CPU each: the in-process loop's work, spread over Ray.
SINGLE = ["cluster.num_rollout_workers=1", "cluster.num_reward_workers=1", "cluster.num_learner_workers=1",
          "cluster.rollout_cpus=1", "cluster.reward_cpus=1", "cluster.learner_cpus=1", "cluster.address=local"]
# SD 1.5's UNet (runwayml/stable-diffusion-v1-5, unet/config.json): only the shapes matter here.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m dense_rl.bench throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench/throughput")
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per configuration (the first is warm-up)")
    parser.add_argument("--repeats", type=int, default=20, help="repeats of each micro-measurement")
    parser.add_argument("--quick", action="store_true", help="2 epochs of 8 samples, 10 steps, 5 repeats: for CI")
    return parser.parse_args(argv)


def steady(values: list[float]) -> float:
    """Median after dropping the first (warm-up) value when there is more than one."""
    return statistics.median(values[1:] if len(values) > 1 else values)


# ---------------------------------------------------------------------------------------- in process


def in_process(config) -> list[dict]:
    from dense_rl.training.trainer import train

    return train(config, show_progress=False)


def credit_compute_seconds(config, repeats: int) -> dict[str, float]:
    """Credit weights + both normalisation stages for one epoch's real trajectories, per mode (best of
    `repeats`: the least disturbed by the other work on the machine)."""
    from dense_rl.algo.advantages import compute_step_advantages
    from dense_rl.algo.credit import cosine_to_final, step_weights_for
    from dense_rl.algo.normalisers import PerPromptStatTracker
    from dense_rl.diffusion.pipeline import build_policy
    from dense_rl.training.prompts import load_prompts
    from dense_rl.training.trainer import sample_epoch

    pipe, _ = build_policy(config)
    trajectories = sample_epoch(pipe, config, load_prompts(config.sample.prompts), epoch=0)
    rewards = torch.randn(trajectories.batch_size).numpy()
    # The rollout reduces its predicted x0s to CoCA's cosines; time that here too, on x0s of their shape.
    x0_preds = trajectories.latents[:, 1:].clone()
    credit = config.credit
    seconds = {}
    for mode in ("sparse", "uniform", "coca"):
        times = []
        for _ in range(repeats):
            trackers = [PerPromptStatTracker(credit.buffer_size, credit.min_count) for _ in range(2)]
            started = time.perf_counter()
            cosines = cosine_to_final(x0_preds, trajectories.final_samples) if mode == "coca" else None
            weights, _ = step_weights_for(mode, cosines, credit.window_size, final_rewards=torch.from_numpy(rewards),
                                          num_steps=config.sample.num_steps)
            compute_step_advantages(
                trajectories.prompts, rewards, weights, credit_mode=mode, num_steps=config.sample.num_steps,
                reward_tracker=trackers[0], step_tracker=trackers[1], temporal_alpha=credit.temporal_alpha,
                adv_clip_max=config.train.adv_clip_max, window_size=credit.window_size,
            )
            times.append(time.perf_counter() - started)
        seconds[mode] = min(times)
    return seconds


# ---------------------------------------------------------------------------------------- Ray system


def ray_system(config) -> dict:
    """Train with the Ray system (a private instance); per-epoch wall time between epoch ends, and the
    reward curve against those times (learning per wall-clock second, not only samples per second)."""
    from dense_rl.system.session import run_system

    ends = []
    with tempfile.TemporaryDirectory() as folder:
        config.run.output_dir, config.run.name = folder, "bench"
        history = run_system(config, f"{folder}/bench", show_progress=False,
                             on_epoch=lambda driver, metrics: ends.append(time.perf_counter()))
    return {"epoch_seconds": [m["epoch_seconds"] for m in history],
            "between_epoch_ends": [b - a for a, b in zip(ends, ends[1:])],
            "seconds_sample_and_score": [m["seconds_sample_and_score"] for m in history],
            "seconds_learn_and_sync": [m["seconds_learn_and_sync"] for m in history],
            "reward_mean": [m["reward_mean"] for m in history],
            "seconds_at_epoch_end": [end - ends[0] for end in ends],
            "samples_per_epoch": config.samples_per_epoch}


def in_process_summary(history: list[dict], samples: int) -> dict:
    """One in-process configuration's per-epoch times and its steady throughput."""
    epoch_s = [m["epoch_seconds"] for m in history]
    return {
        "epoch_seconds": epoch_s, "steady_epoch_seconds": steady(epoch_s),
        "trajectories_per_second": samples / steady(epoch_s),
        **{key: [m[key] for m in history] for key in ("seconds_sample", "seconds_score", "seconds_advantages", "seconds_update")},
    }


def ray_summary(run: dict, samples: int) -> dict:
    """`run` (what ray_system measured) with its steady epoch time, throughput and learning added."""
    # Wall time between epoch ends: in async mode an epoch's sampling overlaps the previous
    # update, so only this measures throughput; it also counts the driver's recording.
    wall = run["between_epoch_ends"]
    run["steady_epoch_seconds"] = statistics.median(wall) if wall else steady(run["epoch_seconds"])
    run["trajectories_per_second"] = samples / run["steady_epoch_seconds"]
    run["learning"] = reward_gain(run)
    return run


def reward_gain(run: dict) -> dict:
    """Reward gained from the first epoch's end to the last, per wall-clock second and per sample
    (start-up excluded: both modes pay it alike)."""
    gain = run["reward_mean"][-1] - run["reward_mean"][0]
    seconds = run["seconds_at_epoch_end"][-1]
    samples = run["samples_per_epoch"] * (len(run["reward_mean"]) - 1)
    return {"reward_gain": gain, "per_second": gain / max(seconds, 1e-9), "per_sample": gain / max(samples, 1)}


def sd15_lora_state(rank: int = 4) -> dict[str, torch.Tensor]:
    """Random LoRA tensors with exactly the shapes a rank-`rank` adapter on SD 1.5's attention
    projections has (the UNet is built on the meta device: no weights, no download)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    state = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith((".to_q", ".to_k", ".to_v", ".to_out.0")):
            state[f"{name}.lora_A.weight"] = torch.randn(rank, module.in_features)
            state[f"{name}.lora_B.weight"] = torch.randn(module.out_features, rank)
    return state


def broadcast_and_bytes(config, repeats: int) -> dict:
    """Weight broadcast to real RolloutWorker actors (tiny LoRA) and to stand-in actors that receive
    and copy an SD 1.5-sized LoRA the same way; bytes of what travels through the object store."""
    import ray

    from dense_rl.system.roles.reward import RewardWorker
    from dense_rl.system.roles.rollout import RolloutWorker

    @ray.remote(num_cpus=1)
    class LoraReceiver:
        """Does what RolloutWorker.set_weights does (fetch the ref, copy into the adapter) for a LoRA
        whose base model is not loaded here."""

        def __init__(self, shapes: dict):
            self.state = {k: torch.zeros(shape) for k, shape in shapes.items()}

        def set_weights(self, version: int, weights: list) -> int:
            for key, tensor in ray.get(weights[0]).items():
                self.state[key].copy_(tensor)
            return version

    def timed_broadcast(state, workers) -> dict:
        put, total = [], []
        for version in range(1, repeats + 1):
            started = time.perf_counter()
            ref = ray.put(state)
            put.append(time.perf_counter() - started)
            ray.get([w.set_weights.remote(version, [ref]) for w in workers])
            total.append(time.perf_counter() - started)
            del ref
        return {"seconds_median": statistics.median(total), "seconds_min": min(total),
                "put_seconds_median": statistics.median(put), "workers": len(workers), **state_size(state)}

    ray.init(address="local", num_cpus=5, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        workers = [RolloutWorker.options(num_cpus=1).remote(config, 1.0) for _ in range(2)]
        version, tiny_state = ray.get(workers[0].weights.remote())
        results = {"tiny": timed_broadcast(tiny_state, workers)}
        sd15_state = sd15_lora_state()
        receivers = [LoraReceiver.remote({k: tuple(v.shape) for k, v in sd15_state.items()}) for _ in range(2)]
        results["sd15_rank4"] = timed_broadcast(sd15_state, receivers)
        for receiver in receivers:  # free their CPUs for the reward actor below
            ray.kill(receiver)
        ray.get(workers[0].set_weights.remote(version, [ray.put(tiny_state)]))

        # What one rollout batch puts in the object store, field by field.
        prompts = ["a red digit seven"] * config.sample.batch_size
        learner_part, reward_part = ray.get(workers[0].generate.remote(prompts, 0))
        scored = ray.get(RewardWorker.options(num_cpus=1).remote(config, 1.0).score.remote(reward_part))
    finally:
        ray.shutdown()
    results["object_store"] = object_store_bytes(learner_part, reward_part, scored)
    return results


def state_size(state: dict[str, torch.Tensor]) -> dict:
    """What a LoRA state weighs in a broadcast: bytes, parameters and tensors."""
    return {"bytes": sum(t.numel() * t.element_size() for t in state.values()),
            "parameters": sum(t.numel() for t in state.values()), "tensors": len(state)}


def object_store_bytes(learner_part, reward_part, scored) -> dict:
    """Bytes per trajectory of a rollout batch in the object store (pickled as Ray does, protocol 5):
    the learner's part and the reward role's, their tensor fields largest first, and the scored batch
    the driver gets back."""
    batch = learner_part.batch_size

    def tensor_bytes(part) -> dict[str, float]:
        sizes = {name: value.numel() * value.element_size() / batch for name, value in vars(part).items()
                 if isinstance(value, torch.Tensor)}
        return dict(sorted(sizes.items(), key=lambda kv: -kv[1]))

    learner_bytes, reward_bytes = len(pickle.dumps(learner_part, protocol=5)), len(pickle.dumps(reward_part, protocol=5))
    return {
        "batch_size": batch, "num_steps": learner_part.num_steps,
        "latent_shape": list(learner_part.latents.shape[2:]), "image_shape": list(reward_part.images.shape[1:]),
        "bytes_per_trajectory": (learner_bytes + reward_bytes) / batch,
        "learner_bytes_per_trajectory": learner_bytes / batch, "reward_bytes_per_trajectory": reward_bytes / batch,
        "field_bytes_per_trajectory": {"learner": tensor_bytes(learner_part), "reward": tensor_bytes(reward_part)},
        "scored_batch_bytes_per_trajectory": len(pickle.dumps(scored, protocol=5)) / batch,
    }


# ---------------------------------------------------------------------------------------- report


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")  # sync that learned nothing: no meaningful ratio


def plot(results: dict, path) -> None:
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), dpi=110)
    names = ["in-process\n(sparse)", "in-process\n(CoCA)", "Ray sync\n(CoCA)", "Ray async\n(CoCA)"]
    values = [results["in_process"]["sparse"]["trajectories_per_second"], results["in_process"]["coca"]["trajectories_per_second"],
              results["ray"]["sync"]["trajectories_per_second"], results["ray"]["async"]["trajectories_per_second"]]
    left.bar(names, values, color=["tab:gray", "tab:red", "tab:orange", "tab:green"])
    left.set_ylabel("trajectories / second (steady epochs)")
    left.set_title("same work, same machine, one run")
    left.grid(alpha=0.3, axis="y")
    parts = results["broadcast_and_bytes"]["object_store"]["field_bytes_per_trajectory"]
    fields = {f"{part}: {name}": size for part, sizes in parts.items() for name, size in sizes.items()}
    right.barh(list(fields), [v / 1024 for v in fields.values()], color="tab:blue")
    right.set_xlabel("KiB per trajectory")
    right.set_title("object-store bytes per trajectory, by field")
    right.invert_yaxis()
    right.grid(alpha=0.3, axis="x")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(argv=None) -> int:
    args = parse_args(argv)
    from dense_rl.config import load_config

    ray_workers_at_normal_priority()
    torch.set_num_threads(1)  # the in-process loop gets what each Ray actor gets: one thread
    overrides = (QUICK if args.quick else []) + args.overrides
    epochs = 2 if args.quick else args.epochs
    repeats = 5 if args.quick else args.repeats
    base = overrides + [f"run.num_epochs={epochs}", f"run.save_every={epochs}"]

    def config_for(*extra):
        return load_config(args.config, base + list(extra))

    report = Report("throughput", args.out, {"config": args.config, "overrides": base, "epochs": epochs,
                                             "repeats": repeats, "torch_threads": 1, "quick": args.quick})
    stages = ["in-process sparse", "in-process CoCA", "credit compute", "Ray sync", "Ray async", "broadcast + bytes"]
    bar = tqdm(total=len(stages), desc="throughput", unit="stage")
    results, loads = {"in_process": {}, "ray": {}}, {}

    def stage(name, fn):
        bar.set_postfix_str(name)
        before = load_average()
        value = fn()
        loads[name] = {"before": before, "after": load_average()}
        report["load_average_by_stage"] = loads
        bar.update(1)
        return value

    samples = config_for().samples_per_epoch
    for mode, name in (("sparse", stages[0]), ("coca", stages[1])):
        history = stage(name, lambda: in_process(config_for(f"credit.mode={mode}")))
        results["in_process"][mode] = in_process_summary(history, samples)
        report["results"] = results
    results["credit_compute_seconds"] = stage(stages[2], lambda: credit_compute_seconds(config_for(), repeats))
    for mode, lag, name in (("sync", 0, stages[3]), ("async", 1, stages[4])):
        run = stage(name, lambda: ray_system(config_for(*SINGLE, f"cluster.max_policy_lag={lag}")))
        results["ray"][mode] = ray_summary(run, samples)
        report["results"] = results
    results["broadcast_and_bytes"] = stage(stages[5], lambda: broadcast_and_bytes(config_for(), repeats))
    bar.close()
    finish(report, results)
    return 0


def ratios_of(results: dict) -> dict:
    """The side-by-side ratios the benchmark reports, from its measured results."""
    inproc, ray_runs, credit = results["in_process"], results["ray"], results["credit_compute_seconds"]
    bcast = results["broadcast_and_bytes"]
    sync_epoch = ray_runs["sync"]["steady_epoch_seconds"]
    return {
        "coca_over_sparse_epoch_time": inproc["coca"]["steady_epoch_seconds"] / inproc["sparse"]["steady_epoch_seconds"],
        "credit_compute_coca_share_of_epoch": credit["coca"] / inproc["coca"]["steady_epoch_seconds"],
        "credit_compute_coca_over_sparse": credit["coca"] / credit["sparse"],
        "ray_sync_over_in_process_throughput": ray_runs["sync"]["trajectories_per_second"] / inproc["coca"]["trajectories_per_second"],
        "async_over_sync_throughput": ray_runs["async"]["trajectories_per_second"] / ray_runs["sync"]["trajectories_per_second"],
        # Noisy over a few epochs of one seed: read beside the sample-efficiency benchmark.
        "async_over_sync_reward_gain_per_second": _ratio(ray_runs["async"]["learning"]["per_second"],
                                                          ray_runs["sync"]["learning"]["per_second"]),
        "broadcast_tiny_share_of_ray_epoch": bcast["tiny"]["seconds_median"] / sync_epoch,
        "broadcast_sd15_share_of_tiny_ray_epoch": bcast["sd15_rank4"]["seconds_median"] / sync_epoch,
    }


def finish(report: Report, results: dict) -> dict:
    """Ratios, results.json, plot and printed table from the measured `results`; returns the ratios."""
    ratios = ratios_of(results)
    report["results"] = results
    report["ratios"] = ratios
    plot(results, report.out / "throughput.png")
    report.finish()

    inproc, ray_runs, credit = results["in_process"], results["ray"], results["credit_compute_seconds"]
    bcast = results["broadcast_and_bytes"]
    store = bcast["object_store"]
    top = next(iter(store["field_bytes_per_trajectory"]["learner"].items()))
    rows = [
        ("credit: CoCA / sparse epoch time (in-process)", ratios["coca_over_sparse_epoch_time"],
         f"{inproc['coca']['steady_epoch_seconds']:.2f} s vs {inproc['sparse']['steady_epoch_seconds']:.2f} s"),
        ("credit: CoCA weights + advantages, share of an epoch", ratios["credit_compute_coca_share_of_epoch"],
         f"{credit['coca'] * 1e3:.2f} ms (sparse {credit['sparse'] * 1e3:.2f} ms)"),
        ("overhead: Ray sync / in-process trajectories per s", ratios["ray_sync_over_in_process_throughput"],
         f"{ray_runs['sync']['trajectories_per_second']:.2f} vs {inproc['coca']['trajectories_per_second']:.2f} traj/s"),
        ("async / sync trajectories per s (Ray)", ratios["async_over_sync_throughput"],
         f"{ray_runs['async']['trajectories_per_second']:.2f} vs {ray_runs['sync']['trajectories_per_second']:.2f} traj/s"),
        ("async / sync reward gained per wall-clock s (Ray)", ratios["async_over_sync_reward_gain_per_second"],
         f"{ray_runs['async']['learning']['reward_gain']:+.3f} vs {ray_runs['sync']['learning']['reward_gain']:+.3f} reward "
         f"over {ray_runs['async']['seconds_at_epoch_end'][-1]:.0f} s vs {ray_runs['sync']['seconds_at_epoch_end'][-1]:.0f} s"),
        ("broadcast tiny LoRA, share of a Ray epoch", ratios["broadcast_tiny_share_of_ray_epoch"],
         f"{bcast['tiny']['seconds_median'] * 1e3:.1f} ms, {bcast['tiny']['bytes'] / 1024:.0f} KiB to {bcast['tiny']['workers']} actors"),
        ("broadcast SD 1.5 rank-4 LoRA, share of a tiny Ray epoch", ratios["broadcast_sd15_share_of_tiny_ray_epoch"],
         f"{bcast['sd15_rank4']['seconds_median'] * 1e3:.1f} ms, {bcast['sd15_rank4']['bytes'] / 2**20:.2f} MiB to {bcast['sd15_rank4']['workers']} actors"),
        ("object store: KiB per trajectory", store["bytes_per_trajectory"] / 1024,
         f"learner's part {store['learner_bytes_per_trajectory'] / 1024:.1f} KiB (largest: {top[0]} {top[1] / 1024:.1f} KiB), "
         f"reward's {store['reward_bytes_per_trajectory'] / 1024:.2f} KiB; driver gets {store['scored_batch_bytes_per_trajectory'] / 1024:.2f} KiB"),
    ]
    print(table(rows, ("measured side by side in this run", "ratio / value", "numbers")))
    print(f"load average at start {report['load_average_start']}, now {load_average()} (on {os.cpu_count()} cores)")
    print(f"wrote {report.out / 'results.json'} and {report.out / 'throughput.png'}")
    return ratios
