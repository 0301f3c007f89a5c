"""The layout chosen when the config leaves worker counts and CPUs empty (dense_rl/config/layout.py)."""

import pytest

from dense_rl.config import load_config
from dense_rl.config.layout import PINNED_DEFAULTS, async_sharing_note, fit_layout, largest_divisor_at_most, placed


def layout(cpus, *overrides):
    cluster = placed(load_config("configs/tiny.yaml", list(overrides)), cluster_cpus=cpus).cluster
    return cluster, cluster.resources_needed()["CPU"]


def test_a_two_core_machine_runs_one_single_threaded_process_per_core_per_stage():
    cluster, cpus = layout(2)
    assert (cluster.num_rollout_workers, cluster.num_reward_workers, cluster.num_learner_workers) == (2, 1, 2)
    assert [cluster.threads(role) for role in ("rollout", "reward", "learner")] == [1, 1, 1]
    assert cpus == pytest.approx(2.0, abs=0.01)  # fits what `ray start --head` reports on that laptop


def test_async_shares_the_cores_between_sampling_and_the_update_as_sync_does():
    for cores in (2, 8):
        lagged, cpus = layout(cores, "cluster.max_policy_lag=1")
        sync, _ = layout(cores)
        assert (lagged.num_rollout_workers, lagged.num_learner_workers) == (sync.num_rollout_workers, sync.num_learner_workers)
        assert lagged.threads("rollout") == lagged.threads("learner") == 1 and cpus <= cores
    assert (lagged.num_rollout_workers, lagged.num_learner_workers) == (2, 8)  # 2 batches an epoch; batch 8 on 8 cores


def test_async_on_cores_that_sampling_and_the_update_share_is_flagged():
    """Measured: async 0.79x sync on 2 shared cores, 1.09-1.12x with a core each for rollout and learner."""
    shared, _ = layout(2, "cluster.max_policy_lag=1")
    note = async_sharing_note(shared, 2)
    assert note.startswith("cluster.max_policy_lag=1: 4 rollout and learner threads share 2 CPUs") and "\n" not in note
    own_cores, _ = layout(2, "cluster.max_policy_lag=1", "cluster.num_rollout_workers=1", "cluster.num_learner_workers=1")
    assert async_sharing_note(own_cores, 2) is None
    assert async_sharing_note(layout(2)[0], 2) is None  # sync: the stages take turns
    gpus = load_config("configs/sd15-jpeg.yaml", ["cluster.max_policy_lag=1"]).cluster
    assert gpus.learner_gpus > 0 and async_sharing_note(gpus, 2) is None


def test_a_bigger_machine_gets_more_processes_not_threads():
    cluster, cpus = layout(16)
    assert cluster.num_rollout_workers == 2 and cluster.threads("rollout") == 1  # one actor per batch
    assert cluster.num_learner_workers == 8 and cluster.threads("learner") == 1  # train.batch_size 8: a row each
    assert cpus <= 16
    cluster, _ = layout(3, "train.batch_size=8")
    assert cluster.num_learner_workers == 2  # a divisor of the batch: every rank takes an equal share


def test_one_cpu_and_explicit_settings():
    cluster, _ = layout(1)
    assert (cluster.num_rollout_workers, cluster.num_learner_workers) == (1, 1)
    cluster, _ = layout(2, "cluster.num_learner_workers=1")  # what is set wins; the rest is chosen
    assert cluster.num_learner_workers == 1 and cluster.threads("learner") == 1 and cluster.num_rollout_workers == 2
    explicit = load_config("configs/tiny.yaml", ["cluster.num_rollout_workers=3", "cluster.num_learner_workers=1",
                                                 "cluster.rollout_cpus=1", "cluster.reward_cpus=1", "cluster.learner_cpus=2"])
    assert fit_layout(explicit, cluster_cpus=2) is explicit.cluster  # a whole layout is left alone
    assert explicit.cluster.threads("learner") == 2


def test_roles_pinned_to_node_groups_get_the_fixed_defaults():
    config = load_config("configs/tiny.yaml", ["cluster.rollout_resource=rollout", "cluster.learner_resource=learner"])
    cluster = fit_layout(config, cluster_cpus=0)  # an autoscaling cluster that has no workers yet
    assert {key: getattr(cluster, key) for key in PINNED_DEFAULTS} == PINNED_DEFAULTS


def test_largest_divisor():
    assert [largest_divisor_at_most(8, n) for n in (1, 2, 3, 5, 8, 20)] == [1, 2, 2, 4, 8, 8]
    assert largest_divisor_at_most(7, 4) == 1
