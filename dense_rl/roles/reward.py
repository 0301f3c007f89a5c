"""RewardWorker: final reward per image and per-step credit weights for a batch: it receives only what it
reads of the batch (8-bit images, the cosine curve; `RewardInputs`), never the latent trajectories."""

from __future__ import annotations

import time
from dataclasses import dataclass

import ray
import torch

from dense_rl import metrics
from dense_rl.config import Config
from dense_rl.diffusion.trajectories import RewardInputs
from dense_rl.errors import start_errors
from dense_rl.roles import use_threads
from dense_rl.scoring import Scores, score_trajectories


@dataclass
class ScoredBatch:
    """What the driver needs from a batch, without the heavy tensors (those stay in the object store)."""

    prompts: list[str]
    policy_version: int
    scores: Scores
    preview: torch.Tensor  # uint8 [n, 3, H, W]: the first images, for the epoch's grid


@ray.remote
class RewardWorker:
    @start_errors  # a failed start reaches the driver as one line (errors.py)
    def __init__(self, config: Config, threads: int = 1, preview_count: int = 8):
        from dense_rl.rewards import WeightedRewards

        use_threads(threads)
        self.credit = config.credit
        device = "cuda" if config.cluster.reward_gpus > 0 else "cpu"
        self.rewards = WeightedRewards(config.rewards, device=device)
        self.preview_count = preview_count

    def score(self, batch: RewardInputs) -> ScoredBatch:
        from dense_rl import chaos

        started = time.perf_counter()
        scores = score_trajectories(self.rewards, batch, self.credit)
        metrics.record_scoring(time.perf_counter() - started)
        fault = chaos.strike("reward_values", batch.policy_version)
        if fault is not None and fault["action"] == "nan":  # a reward model gone numerically bad
            rows = fault.get("rows", list(range(len(batch.prompts))))
            scores.rewards[rows] = torch.tensor([(float("nan"), float("inf"))[i % 2] for i in range(len(rows))])
        # clone: a slice would pickle the whole batch's storage back to the driver
        return ScoredBatch(batch.prompts, batch.policy_version, scores, batch.images[: self.preview_count].clone())

    def pid(self) -> int:
        import os

        return os.getpid()
