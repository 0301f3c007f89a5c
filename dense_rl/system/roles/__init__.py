"""The Ray roles. Each is a thin wrapper around the plain-PyTorch algorithm in dense_rl/*."""

import torch


def use_threads(threads: int) -> None:
    """torch's thread pool for this actor (cluster.threads(role)), so actors do not oversubscribe."""
    torch.set_num_threads(max(1, int(threads)))
