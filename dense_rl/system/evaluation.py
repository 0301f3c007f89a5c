"""The held-out evaluation in the Ray system: the held-out set's batches sampled by the rollout actors
(with a given policy version's weights, or the adapters off for the base model) and scored by the reward
actors, each batch to the next actor in turn. What the results mean and where they go is the training
layer's (dense_rl/training/guards.py), the same as for the in-process trainer."""

from __future__ import annotations

import logging
import time

import ray
import torch
from ray.exceptions import RayError

from dense_rl.config import Config
from dense_rl.system.recovery import first_line
from dense_rl.training.heldout import heldout_set

log = logging.getLogger("dense_rl")
PREVIEW = 32  # images of the evaluation's grid


class HeldoutEvaluation:
    def __init__(self, config: Config, rollout_workers: list, reward_workers: list):
        self.rollout_workers, self.reward_workers = rollout_workers, reward_workers
        self.held_out = heldout_set(config)

    def issue(self, weights: tuple[int, list] | None = None, base: bool = False) -> tuple[list, float]:
        """Start the evaluation of policy `weights` (version, [ObjectRef]) or of the base model: the
        ObjectRefs of each batch's (scores, preview) and when it started. Nothing waits here."""
        refs, left = [], PREVIEW
        for index, (seed, items) in enumerate(self.held_out.batches):
            prompts = [prompt for prompt, _ in items]
            rollout = self.rollout_workers[index % len(self.rollout_workers)]
            images = rollout.evaluate.remote(prompts, seed, weights, base)
            refs.append(self.reward_workers[index % len(self.reward_workers)].score_heldout.remote(images, max(left, 0)))
            left -= len(items)
        return refs, time.perf_counter()

    @staticmethod
    def collect(issued: tuple[list, float]) -> tuple[list, torch.Tensor, float] | None:
        """(each batch's scores, the first images, seconds since it was issued), or None when an actor
        failed meanwhile: that evaluation is skipped, with a warning, and training goes on."""
        refs, started = issued
        try:
            answers = ray.get(refs)
        except RayError as error:
            log.warning("held-out evaluation skipped: %s", first_line(error))
            return None
        return [scores for scores, _ in answers], torch.cat([preview for _, preview in answers]), time.perf_counter() - started
