"""Seeds derived from (run seed, epoch, batch or rank) alone, shared by the Ray system and the in-process
loop (this module imports no Ray), so both sample the same batches and shuffle them the same way."""

from __future__ import annotations

import numpy as np
import torch


def batch_seed(seed: int, epoch: int, batch: int) -> int:
    """Noise seed of one rollout batch: a function of (seed, epoch, batch) alone, so a resumed run,
    or a batch re-issued to another worker, samples exactly the same noise."""
    return int(np.random.SeedSequence([seed, epoch, batch]).generate_state(1)[0])


def prompt_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator that draws an epoch's prompts."""
    return np.random.default_rng([seed, epoch])


def update_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of a learner rank's minibatch and timestep shuffles in one epoch (no RNG state to
    checkpoint). The in-process loop is rank 0 of 1, so it shuffles exactly as a 1-rank learner does."""
    return int(np.random.SeedSequence([seed, epoch, rank, 1]).generate_state(1)[0])


def minibatch_rows(num_rows: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """The rows of each minibatch of ppo_update's first pass over `num_rows` trajectories, in the order
    it trains them, when its generator is seeded with `seed` (that pass's order is the generator's
    first draw): lets the driver have each minibatch's proximal log-probs computed in time."""
    return list(torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed)).split(batch_size))
