"""The Ray roles. Each is a thin wrapper around the plain-PyTorch algorithm in dense_rl/*."""

import torch


def use_actor_cpus(num_cpus: float) -> None:
    """Match torch's thread pool to the CPUs Ray gave this actor, so actors do not oversubscribe."""
    torch.set_num_threads(max(1, int(num_cpus)))
