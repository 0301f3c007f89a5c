"""The data types that travel between the driver and the roles (through Ray's object store or as call
arguments and results). Plain dataclasses: the heavy tensors (Trajectories, dense_rl.diffusion.trajectories)
stay in the object store and travel as ObjectRefs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import ray
import torch

from dense_rl.training.scoring import ScoredBatch  # the reward role's answer (the in-process trainer makes them too)

__all__ = ["LearnerResult", "RolloutBatch", "ScoredBatch", "Work"]


@dataclass
class RolloutBatch:
    """One rollout call of an epoch: enough to issue it again anywhere."""

    epoch: int
    index: int
    prompts: list[str]
    seed: int
    worker: int  # index of the rollout worker it was last issued to
    ref: ray.ObjectRef | None = None  # the learner's part (Trajectories.for_learner)
    reward_ref: ray.ObjectRef | None = None  # the reward role's part (RewardInputs)
    reissues: int = 0


@dataclass
class LearnerResult:
    version: int
    metrics: dict
    checkpoint: str | None  # the checkpoint folder, relative to the run directory, when one was saved
    weights: list | None = None  # [ObjectRef] of the LoRA state of `version`, as published


@dataclass
class Work:
    epoch: int
    pieces: list  # (ObjectRef of Trajectories, row indices in that batch)
    step_advantages: torch.Tensor
    # (ObjectRef of [n, T] log-probs under version `epoch` from RolloutWorker.rescore, the n row indices
    # of this work they belong to): for batches sampled by an older version; empty when there are none.
    proximal: list = dataclasses.field(default_factory=list)
