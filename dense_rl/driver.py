"""The driver: owns the epoch loop and reads like the diagram in DESIGN.md.

    prompts -> RolloutWorkers -> trajectories (ObjectRefs) -> RewardWorkers -> rewards + step credits
            -> per-prompt advantages (here) -> Learner group (PPO, DDP) -> new LoRA version -> RolloutWorkers

Sync mode (max_policy_lag = 0) is exactly on-policy. Async mode starts the next epoch's rollouts as
soon as this epoch's batch is handed to the learner; a batch sampled more than `max_policy_lag`
versions behind the learner is sampled again rather than trained on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import ray
import torch
from tqdm.auto import tqdm

from dense_rl.advantages import compute_step_advantages
from dense_rl.config import Config
from dense_rl.prompts import choose_prompts, load_prompts
from dense_rl.roles.learner import LearnerGroup
from dense_rl.roles.reward import RewardWorker, ScoredBatch
from dense_rl.roles.rollout import RolloutWorker
from dense_rl.run_record import RunRecorder
from dense_rl.seeds import batch_seed, prompt_rng
from dense_rl.stats import PerPromptStatTracker

log = logging.getLogger("dense_rl")


@dataclass
class DriverState:
    """Everything the driver needs to continue a run; saved with each checkpoint."""

    epoch: int = 0  # the next epoch to run == the learner's policy version
    samples_seen: int = 0
    reward_tracker: PerPromptStatTracker | None = None
    step_tracker: PerPromptStatTracker | None = None
    history: list[dict] = field(default_factory=list)


class Driver:
    def __init__(self, config: Config, recorder: RunRecorder, state: DriverState, initial_weights: dict | None = None,
                 resume_from: str | None = None):
        self.config = config
        self.recorder = recorder
        self.state = state
        self.prompts = load_prompts(config.sample.prompts)
        cluster = config.cluster
        self.rollout_workers = [
            RolloutWorker.options(num_cpus=cluster.rollout_cpus, num_gpus=cluster.rollout_gpus,
                                  resources=cluster.custom_resources("rollout")).remote(config, cluster.rollout_cpus)
            for _ in range(cluster.num_rollout_workers)
        ]
        self.reward_workers = [
            RewardWorker.options(num_cpus=cluster.reward_cpus, num_gpus=cluster.reward_gpus,
                                 resources=cluster.custom_resources("reward")).remote(config, cluster.reward_cpus)
            for _ in range(cluster.num_reward_workers)
        ]
        if initial_weights is not None:  # resuming: rollouts start from the checkpoint's LoRA
            weights = ray.put(initial_weights)
            ray.get([w.set_weights.remote(state.epoch, [weights]) for w in self.rollout_workers])
        self.learner = LearnerGroup(config, self.rollout_workers, recorder.run.uri, start_version=state.epoch,
                                    resume_from=resume_from)

    # ------------------------------------------------------------------ one stage each

    def sample(self, epoch: int) -> list[ray.ObjectRef]:
        """prompts -> RolloutWorkers: one ObjectRef of Trajectories per batch, round-robin over workers."""
        rng = prompt_rng(self.config.run.seed, epoch)
        sample = self.config.sample
        refs = []
        for batch in range(sample.num_batches_per_epoch):
            prompts = choose_prompts(rng, self.prompts, sample.batch_size, sample.samples_per_prompt)
            worker = self.rollout_workers[batch % len(self.rollout_workers)]
            refs.append(worker.generate.remote(prompts, batch_seed(self.config.run.seed, epoch, batch)))
        return refs

    def score(self, trajectory_refs: list[ray.ObjectRef]) -> list[ScoredBatch]:
        """Trajectories -> RewardWorkers: rewards and per-step credit weights (the heavy tensors stay put)."""
        workers = self.reward_workers
        return ray.get([workers[i % len(workers)].score.remote(ref) for i, ref in enumerate(trajectory_refs)])

    def advantages(self, scored: list[ScoredBatch]) -> tuple[torch.Tensor, dict]:
        """Per-prompt normalisation of rewards, then of the shaped step rewards (both stages here,
        because the trackers must see every sample of the epoch)."""
        prompts = [p for batch in scored for p in batch.prompts]
        rewards = torch.cat([batch.scores.rewards for batch in scored])
        weights = None if scored[0].scores.step_weights is None else torch.cat([b.scores.step_weights for b in scored])
        credit = self.config.credit
        return compute_step_advantages(
            prompts, rewards, weights, credit_mode=credit.mode, num_steps=self.config.sample.num_steps,
            reward_tracker=self.state.reward_tracker, step_tracker=self.state.step_tracker,
            temporal_alpha=credit.temporal_alpha, adv_clip_max=self.config.train.adv_clip_max,
            window_size=credit.window_size,
        )

    def refresh_stale(self, epoch: int, refs: list[ray.ObjectRef], scored: list[ScoredBatch]) -> list[ScoredBatch]:
        """Async mode: sample again any batch more than max_policy_lag versions behind the learner.
        (The learner waits until every worker holds its newest weights, so the new batch is current.)"""
        max_lag = self.config.cluster.max_policy_lag
        for i, batch in enumerate(scored):
            lag = epoch - batch.policy_version
            if lag > max_lag:
                log.warning("batch %d of epoch %d is %d versions old (bound %d); sampling it again", i, epoch, lag, max_lag)
                worker = self.rollout_workers[i % len(self.rollout_workers)]
                refs[i] = worker.generate.remote(batch.prompts, batch_seed(self.config.run.seed, epoch, i))
                scored[i] = self.score([refs[i]])[0]
        return scored

    # ------------------------------------------------------------------ the loop

    def run(self, show_progress: bool = True, on_epoch=None) -> list[dict]:
        """Run to config.run.num_epochs; `on_epoch(driver, metrics)` is called after each epoch."""
        config, state = self.config, self.state
        asynchronous = config.cluster.max_policy_lag >= 1
        bar = tqdm(total=config.run.num_epochs, initial=state.epoch, desc="epochs", unit="epoch",
                   disable=not show_progress, dynamic_ncols=True)
        pending = self.sample(state.epoch) if state.epoch < config.run.num_epochs else None
        try:
            for epoch in range(state.epoch, config.run.num_epochs):
                started = time.perf_counter()
                trajectory_refs = pending
                scored = self.score(trajectory_refs)
                sampled_and_scored = time.perf_counter()
                if asynchronous:
                    scored = self.refresh_stale(epoch, trajectory_refs, scored)
                step_advantages, advantage_info = self.advantages(scored)
                self.learner.submit(epoch, trajectory_refs, step_advantages)
                pending = None
                if asynchronous and epoch + 1 < config.run.num_epochs:
                    pending = self.sample(epoch + 1)  # overlaps the learner's update
                result = self.learner.wait(epoch)
                if not asynchronous and epoch + 1 < config.run.num_epochs:
                    pending = self.sample(epoch + 1)
                learned = time.perf_counter()

                state.epoch = epoch + 1
                state.samples_seen += sum(len(b.prompts) for b in scored)
                metrics = self.recorder.epoch_metrics(
                    epoch, state, scored, advantage_info, result.metrics,
                    timings={"sample_and_score": sampled_and_scored - started, "learn_and_sync": learned - sampled_and_scored},
                )
                state.history.append(metrics)
                self.recorder.record_epoch(epoch, state, scored, metrics, checkpoint=result.checkpoint)
                bar.update(1)
                bar.set_postfix(samples=state.samples_seen, reward=f"{metrics['reward_mean']:.3f}",
                                samples_per_s=f"{metrics['samples_per_second']:.1f}")
                log.info(self.recorder.epoch_line(metrics))
                if on_epoch is not None:
                    on_epoch(self, metrics)
        finally:
            bar.close()
            self.learner.close()
        return state.history
