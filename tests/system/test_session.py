"""Starting Ray for a run: a private instance is sized from the layout the run will get."""

from dense_rl.config import load_config


def test_a_private_instance_advertises_what_the_layout_asks_for():
    """start_ray sizes a private instance from the layout it will get: the role-pinned defaults need
    4.5 CPUs and one unit of each custom resource, more than a 2-core machine's CPUs."""
    import ray

    from dense_rl.system.session import start_ray

    config = load_config("configs/tiny.yaml", ["cluster.address=local", "cluster.rollout_resource=rollout",
                                               "cluster.learner_resource=learner"])
    start_ray(config)
    try:
        resources = ray.cluster_resources()
        assert resources["rollout"] == 2 and resources["learner"] == 2 and resources["CPU"] >= 4.5
    finally:
        ray.shutdown()
