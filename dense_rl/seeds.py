"""Seeds derived from (run seed, epoch, batch) alone, shared by the Ray driver and the in-process loop
(this module imports no Ray), so both sample exactly the same batches."""

from __future__ import annotations

import numpy as np


def batch_seed(seed: int, epoch: int, batch: int) -> int:
    """Noise seed of one rollout batch: a function of (seed, epoch, batch) alone, so a resumed run,
    or a batch re-issued to another worker, samples exactly the same noise."""
    return int(np.random.SeedSequence([seed, epoch, batch]).generate_state(1)[0])


def prompt_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator that draws an epoch's prompts."""
    return np.random.default_rng([seed, epoch])
