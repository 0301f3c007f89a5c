"""RolloutWorker: holds the pipeline and its LoRA adapter, samples trajectory batches.

`set_weights` runs in its own concurrency group, beside a `generate` in progress rather than queued
behind it: it fetches the new LoRA state and parks it, and the next `generate` swaps it in before it
samples. So a broadcast costs what the transfer costs, and no trajectory mixes two policy versions.

The driver imports this module to create the actors but never samples, so the diffusion stack
(diffusers, transformers, peft: about 7 s of imports) is imported in the actor's methods only.
"""

from __future__ import annotations

import threading
import time

import ray
import torch

from dense_rl.config import Config
from dense_rl.diffusion.trajectories import RewardInputs, Trajectories
from dense_rl.system import faults, telemetry
from dense_rl.system.errors import start_errors
from dense_rl.system.roles import use_threads


@ray.remote(concurrency_groups={"weights": 1})
class RolloutWorker:
    @start_errors  # a failed start reaches the driver as one line (dense_rl.system.errors)
    def __init__(self, config: Config, threads: int = 1):
        from dense_rl.diffusion.pipeline import build_policy

        use_threads(threads)
        self.config = config
        self.pipe, _ = build_policy(config)
        self.version = 0
        self._pending: tuple[int, dict] | None = None  # weights received, not yet swapped in
        self._pending_lock = threading.Lock()
        telemetry.record_policy_version("rollout", self.version)

    @ray.method(concurrency_group="weights")
    def set_weights(self, version: int, weights: list) -> int:
        """Receive LoRA state `weights[0]` (an ObjectRef wrapped in a list so Ray does not resolve it
        before this call is scheduled) for samples after this call to use, tagged with `version`.
        Every `generate` that starts after this returns samples with these weights."""
        state = ray.get(weights[0]) if isinstance(weights[0], ray.ObjectRef) else weights[0]
        with self._pending_lock:
            self._pending = (version, state)
        return version

    def _swap_in_pending(self) -> None:
        from dense_rl.diffusion.lora import load_lora_state_dict
        from dense_rl.diffusion.pipeline import denoiser

        with self._pending_lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            load_lora_state_dict(denoiser(self.pipe), pending[1])
            self.version = pending[0]
            telemetry.record_policy_version("rollout", self.version)

    @ray.method(num_returns=2)
    def generate(self, prompts: list[str], seed: int, weights: tuple[int, list] | None = None
                 ) -> tuple[Trajectories, RewardInputs]:
        """One batch, as two objects: the learner's part and the reward role's (8-bit images and the
        cosine curve), so neither pulls what it does not read. The seed, not the worker, decides the
        noise, so any worker gives the same batch. `weights` (version, [ObjectRef]) are swapped in
        first: calls in different concurrency groups run in no fixed order, so a caller that needs
        this batch on given weights passes them here."""
        from dense_rl.training.recipe import sample_batch

        if weights is not None:
            self.set_weights(*weights)
        self._swap_in_pending()
        faults.strike("rollout", self.version)
        started = time.perf_counter()
        trajectories = sample_batch(self.pipe, self.config, prompts, seed, self.version)
        telemetry.record_rollout_batch(len(prompts), self.config.sample.num_steps, time.perf_counter() - started)
        return trajectories.for_learner(), trajectories.for_reward()

    def evaluate(self, prompts: list[str], seed: int, weights: tuple[int, list] | None = None,
                 base: bool = False) -> RewardInputs:
        """One batch of the held-out set (fixed noise `seed`), sampled as evaluation samples
        (evaluation.*), with `weights` (version, [ObjectRef]) swapped in first, or with the adapters off
        (`base`: the pretrained model, policy version 0). What the reward role scores of it."""
        from dense_rl.diffusion.pipeline import denoiser
        from dense_rl.diffusion.sampler import sample_trajectories
        from dense_rl.training.recipe import evaluation_sampler_options

        if weights is not None:
            self.set_weights(*weights)
        self._swap_in_pending()
        model = denoiser(self.pipe)
        if base:
            model.disable_adapters()
        try:
            trajectories = sample_trajectories(self.pipe, prompts, **evaluation_sampler_options(self.config, self.pipe),
                                               generator=torch.Generator().manual_seed(seed),
                                               policy_version=0 if base else self.version)
        finally:
            model.enable_adapters()
        return trajectories.for_reward()

    def rescore(self, pieces: list, version: int) -> torch.Tensor | None:
        """[rows, T] log-probs of the stored actions of `pieces` ([(ObjectRef of a batch's Trajectories,
        its rows)], in that order) under this worker's weights if they are policy `version`, else None:
        decoupled PPO's proximal log-probs for a learner at `version` (async mode), computed here while
        the learner trains, so that it need not."""
        from dense_rl.diffusion.pipeline import denoiser
        from dense_rl.training.recipe import rescore

        self._swap_in_pending()
        if self.version != version:
            return None
        batches = ray.get([ref for ref, _ in pieces])
        trajectories = Trajectories.concat([batch.select(torch.tensor(rows)) for batch, (_, rows) in zip(batches, pieces)])
        return rescore(denoiser(self.pipe), self.pipe.scheduler, trajectories, self.config)

    def pid(self) -> int:
        import os

        return os.getpid()

    def weights(self) -> tuple[int, dict]:
        """(version, LoRA state): lets tests and the driver check what this worker samples with."""
        from dense_rl.diffusion.lora import lora_state_dict
        from dense_rl.diffusion.pipeline import denoiser

        self._swap_in_pending()
        return self.version, lora_state_dict(denoiser(self.pipe))
