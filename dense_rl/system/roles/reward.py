"""RewardWorker: final reward per image and per-step credit weights for a batch: it receives only what it
reads of the batch (8-bit images, the cosine curve; `RewardInputs`), never the latent trajectories."""

from __future__ import annotations

import time

import ray
import torch

from dense_rl.config import Config
from dense_rl.diffusion.trajectories import RewardInputs
from dense_rl.system import faults, telemetry
from dense_rl.system.errors import start_errors
from dense_rl.system.messages import ScoredBatch
from dense_rl.system.roles import use_threads
from dense_rl.training.heldout import extra_reward_specs, score_heldout
from dense_rl.training.monitors import image_monitors
from dense_rl.training.scoring import score_trajectories


@ray.remote
class RewardWorker:
    @start_errors  # a failed start reaches the driver as one line (dense_rl.system.errors)
    def __init__(self, config: Config, threads: int = 1, preview_count: int = 8):
        from dense_rl.rewards import WeightedRewards

        use_threads(threads)
        self.credit = config.credit
        device = "cuda" if config.cluster.reward_gpus > 0 else "cpu"
        self.rewards = WeightedRewards(config.rewards, device=device)
        extra = extra_reward_specs(config) if config.evaluation.every_epochs else []
        self.extra_rewards = WeightedRewards(extra, device=device) if extra else None  # held-out only
        self.preview_count = preview_count
        self.version = 0  # of the batch being scored
        if faults.planned():
            self._let_faults_strike_in_rewards()

    def _let_faults_strike_in_rewards(self) -> None:
        """Reliability tests: planned faults strike inside each reward's call, so the run's error names
        that reward as a real failure of it would (WeightedRewards names the reward that raised)."""
        for name, reward in list(self.rewards.rewards.items()):
            def faulty(images, prompts, reward=reward, name=name):
                faults.strike("reward", self.version, name=name)
                return reward(images, prompts)

            self.rewards.rewards[name] = faulty

    def score(self, batch: RewardInputs) -> ScoredBatch:
        self.version = batch.policy_version
        started = time.perf_counter()
        scores = score_trajectories(self.rewards, batch, self.credit)
        telemetry.record_scoring(time.perf_counter() - started)
        fault = faults.strike("reward_values", batch.policy_version)
        if fault is not None and fault["action"] == "nan":  # a reward model gone numerically bad
            rows = fault.get("rows", list(range(len(batch.prompts))))
            scores.rewards[rows] = torch.tensor([(float("nan"), float("inf"))[i % 2] for i in range(len(rows))])
        # clone: a slice would pickle the whole batch's storage back to the driver
        return ScoredBatch(batch.prompts, batch.policy_version, scores, batch.images[: self.preview_count].clone(),
                           image_monitors(batch.images, batch.prompts))

    def score_heldout(self, batch: RewardInputs, preview_count: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """A held-out batch's scores per image (the trained rewards, `trained`, the extra rewards, the image
        monitors) and its first `preview_count` images."""
        return (score_heldout(self.rewards, self.extra_rewards, batch.images, batch.prompts),
                batch.images[:preview_count].clone())

    def pid(self) -> int:
        import os

        return os.getpid()
