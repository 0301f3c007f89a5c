"""How many rollout, reward and learner workers to run, and with how many threads, when the config
leaves it to us (any `cluster.*` count or CPU share that is null).

On CPUs one single-threaded process per core beats one process with a thread per core, for sampling
(independent batches) and for the update (DDP ranks); docs/benchmarks.md has the measurements. So:

- Sync mode: the stages take turns (sample and score, then update), so each stage may use every core:
  as many rollout actors as cores (at most one per batch of the epoch) and as many learner ranks as
  cores (a divisor of train.batch_size). Each actor asks Ray for an equal share of the CPUs, so the
  whole layout fits exactly the CPUs the cluster reports: a private instance, `ray start --head` on a
  2-core laptop, or a real cluster.
- Async mode: the same layout. Sampling overlaps the update and the stages share the cores; splitting
  the cores between them instead (half rollouts, half learner ranks) measured slower on the peer
  workload, where the update is three quarters of the work (docs/benchmarks.md).
- One reward actor. Every actor is single-threaded unless `cluster.*_threads` says otherwise.

Only what the config leaves empty is chosen; explicit settings win. GPU layouts (`*_gpus > 0`) are
explicit in their presets (configs/sd15-*.yaml), so this chooses only CPU ones. Roles pinned to node
groups by `cluster.*_resource` (KubeRay, cluster/local_multinode.yaml) get fixed defaults instead: an
autoscaler adds those nodes after the launch, so the CPUs reported then say nothing about them.
"""

from __future__ import annotations

import dataclasses
import math

from dense_rl.config import ClusterConfig, Config

# Per role-pinned node group: what deploy/kuberay's worker groups are sized for.
PINNED_DEFAULTS = dict(num_rollout_workers=2, num_learner_workers=2, rollout_cpus=1.0, reward_cpus=0.5, learner_cpus=1.0)


def largest_divisor_at_most(number: int, limit: int) -> int:
    return max(d for d in range(1, max(1, min(number, limit)) + 1) if number % d == 0)


def fit_layout(config: Config, cluster_cpus: float) -> ClusterConfig:
    """The cluster section with every empty count, CPU share and thread count filled in for a Ray
    cluster that reports `cluster_cpus` CPUs."""
    cluster = config.cluster
    if cluster.is_placed:
        return cluster
    if any(cluster.custom_resources(role) for role in ("rollout", "reward", "learner")):
        return dataclasses.replace(cluster, **{k: v if getattr(cluster, k) is None else getattr(cluster, k)
                                               for k, v in PINNED_DEFAULTS.items()})
    cores = max(1, int(cluster_cpus))
    rollouts = cluster.num_rollout_workers or max(1, min(cores, config.sample.num_batches_per_epoch))
    learners = cluster.num_learner_workers or largest_divisor_at_most(config.train.batch_size, cores)
    rewards = cluster.num_reward_workers
    # Equal shares of what the cluster has, so the whole layout is placeable on it.
    share = math.floor(1000 * cores / (rollouts + learners + rewards)) / 1000  # rounded down: the sum fits
    return dataclasses.replace(
        cluster,
        num_rollout_workers=rollouts, num_learner_workers=learners,
        rollout_cpus=cluster.rollout_cpus if cluster.rollout_cpus is not None else share,
        reward_cpus=cluster.reward_cpus if cluster.reward_cpus is not None else share,
        learner_cpus=cluster.learner_cpus if cluster.learner_cpus is not None else share,
        # One thread each: a 2-thread learner on 2 shared cores is slower and erratic against two
        # 1-thread ranks; more threads are a choice (cluster.*_threads).
        rollout_threads=cluster.rollout_threads or 1,
        reward_threads=cluster.reward_threads or 1,
        learner_threads=cluster.learner_threads or 1,
    )


def learner_scaling(cluster: ClusterConfig) -> dict:
    """Ray Train's ScalingConfig for the learner group of a placed layout, as keyword arguments: one
    worker per rank, each asking for its CPUs, its GPU share and the learner's custom resource."""
    resources = {"CPU": cluster.learner_cpus, **cluster.custom_resources("learner")}
    if cluster.learner_gpus > 0:
        resources["GPU"] = cluster.learner_gpus
    return dict(num_workers=cluster.num_learner_workers, use_gpu=cluster.learner_gpus > 0,
                resources_per_worker=resources, placement_strategy=cluster.learner_placement)


def describe_layout(cluster: ClusterConfig, cluster_cpus: float) -> str:
    """One line for the log: what runs where, and how to change it."""
    return (f"layout for {cluster_cpus:g} CPUs: {cluster.num_rollout_workers} rollout x {cluster.threads('rollout')} thread(s), "
            f"{cluster.num_reward_workers} reward, {cluster.num_learner_workers} learner rank(s) x "
            f"{cluster.threads('learner')} thread(s), asking for {cluster.resources_needed()['CPU']:g} CPUs "
            "(set cluster.* to choose)")


def async_sharing_note(cluster: ClusterConfig, cluster_cpus: float) -> str | None:
    """A warning for async mode on CPUs that sampling and the update must share, else None. There async
    does more work than sync (each stale batch is rescored under the learner's weights, about a third
    of an update) and has little idle time to overlap, so it is slower than sync there; it is faster
    with a core each for the rollout and the learner (docs/benchmarks.md, "Async mode")."""
    if cluster.max_policy_lag < 1 or cluster.rollout_gpus > 0 or cluster.learner_gpus > 0:
        return None
    threads = (cluster.num_rollout_workers * cluster.threads("rollout")
               + cluster.num_learner_workers * cluster.threads("learner"))
    if threads <= cluster_cpus:
        return None
    return (f"cluster.max_policy_lag=1: {threads} rollout and learner threads share {cluster_cpus:g} CPUs, where async "
            "is slower than sync (each stale batch is rescored, on the same cores, and sampling has no free core to "
            "overlap); async pays when rollouts and learners have cores or GPUs of their own")


def placed(config: Config, cluster_cpus: float) -> Config:
    """`config` with its cluster section fitted (dense_rl.config.validate checks the result again)."""
    from dense_rl.config import validate

    fitted = dataclasses.replace(config, cluster=fit_layout(config, cluster_cpus))
    validate(fitted)
    return fitted
