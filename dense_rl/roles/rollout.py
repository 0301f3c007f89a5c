"""RolloutWorker: holds the pipeline and its LoRA adapter, samples trajectory batches."""

from __future__ import annotations

import time

import ray
import torch

from dense_rl import metrics

from dense_rl.config import Config
from dense_rl.diffusion.sampler import Trajectories, sample_trajectories
from dense_rl.lora import load_lora_state_dict, lora_state_dict


def use_actor_cpus(num_cpus: float) -> None:
    """Match torch's thread pool to the CPUs Ray gave this actor, so actors do not oversubscribe."""
    torch.set_num_threads(max(1, int(num_cpus)))


@ray.remote
class RolloutWorker:
    def __init__(self, config: Config, num_cpus: float = 1.0):
        from dense_rl.loop import build_policy  # imported in the actor, not at driver import time

        use_actor_cpus(num_cpus)
        self.config = config
        self.pipe, _ = build_policy(config)
        self.version = 0
        metrics.record_policy_version("rollout", self.version)

    def set_weights(self, version: int, weights: list) -> int:
        """Swap in LoRA state `weights[0]` (an ObjectRef wrapped in a list so Ray does not resolve it
        before this call is scheduled) and tag later samples with `version`."""
        state = ray.get(weights[0]) if isinstance(weights[0], ray.ObjectRef) else weights[0]
        load_lora_state_dict(self.pipe.unet, state)
        self.version = version
        metrics.record_policy_version("rollout", version)
        return version

    def generate(self, prompts: list[str], seed: int) -> Trajectories:
        """One batch; the seed, not the worker, decides the noise, so any worker gives the same batch."""
        from dense_rl import chaos

        chaos.strike("rollout", self.version)
        sample = self.config.sample
        started = time.perf_counter()
        trajectories = sample_trajectories(
            self.pipe, prompts, num_steps=sample.num_steps, guidance_scale=sample.guidance_scale, eta=sample.eta,
            negative_prompt=sample.negative_prompt, generator=torch.Generator().manual_seed(seed),
            policy_version=self.version,
        )
        metrics.record_rollout_batch(len(prompts), sample.num_steps, time.perf_counter() - started)
        return trajectories

    def pid(self) -> int:
        import os

        return os.getpid()

    def weights(self) -> tuple[int, dict]:
        """(version, LoRA state): lets tests and the driver check what this worker samples with."""
        return self.version, lora_state_dict(self.pipe.unet)
