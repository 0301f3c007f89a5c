"""The driver: owns the epoch loop and reads like the system diagram in README.md.

    prompts -> RolloutWorkers -> trajectories (ObjectRefs) -> RewardWorkers -> rewards + step credits
            -> per-prompt advantages (here) -> Learner group (PPO, DDP) -> new LoRA version -> RolloutWorkers

Sync mode (max_policy_lag = 0) is exactly on-policy. Async mode starts the next epoch's rollouts as
soon as this epoch's batch is handed to the learner; a batch sampled more than `max_policy_lag`
versions behind the learner is sampled again rather than trained on.

The driver's state (DriverState: epoch, samples seen, stat trackers, history) and how a checkpoint
completes and resumes live in dense_rl/run/checkpoints.py; what each epoch writes in dense_rl/run/records.py.

Failures are handled in small helpers (dense_rl/system/recovery.py, the learner group), not in the loop: a
lost rollout batch is issued again, a failed reward call retried, bad rewards dropped, a restarted
learner group served its epoch again (docs/reliability.md).
"""

from __future__ import annotations

import itertools
import logging
import time

import ray
import torch
from tqdm.auto import tqdm

from dense_rl.config import Config, RunFailed
from dense_rl.run.checkpoints import DriverState
from dense_rl.run.records import RunRecorder, epoch_metrics
from dense_rl.system.evaluation import HeldoutEvaluation
from dense_rl.system.messages import RolloutBatch, ScoredBatch
from dense_rl.system.recovery import Recovery, wait_until_started
from dense_rl.system.roles.learner import LearnerGroup
from dense_rl.system.roles.reward import RewardWorker
from dense_rl.system.roles.rollout import RolloutWorker
from dense_rl.system.telemetry import DriverMetrics
from dense_rl.training.guards import HeldoutWatch, Verdict
from dense_rl.training.prompts import load_prompts
from dense_rl.training.recipe import epoch_advantages, epoch_batches, rows_with_signal
from dense_rl.training.scoring import finite_rewards

log = logging.getLogger("dense_rl")


class Driver:
    def __init__(self, config: Config, recorder: RunRecorder, state: DriverState, initial_weights: dict | None = None,
                 resume_from: str | None = None):
        self.config = config
        self.recorder = recorder
        self.state = state
        self.prompts = load_prompts(config.sample.prompts)
        cluster = config.cluster
        # A dead actor restarts; its calls are not retried by Ray but re-issued by Recovery, which first
        # gives a restarted rollout actor the newest weights.
        restarts = dict(max_restarts=cluster.actor_restarts, max_task_retries=0)
        self.rollout_workers = [
            RolloutWorker.options(num_cpus=cluster.rollout_cpus, num_gpus=cluster.rollout_gpus,
                                  resources=cluster.custom_resources("rollout"), **restarts
                                  ).remote(config, cluster.threads("rollout"))
            for _ in range(cluster.num_rollout_workers)
        ]
        self.reward_workers = [
            RewardWorker.options(num_cpus=cluster.reward_cpus, num_gpus=cluster.reward_gpus,
                                 resources=cluster.custom_resources("reward"), **restarts
                                 ).remote(config, cluster.threads("reward"))
            for _ in range(cluster.num_reward_workers)
        ]
        # Started now, so that the learner group's start overlaps the other actors' loading.
        self.learner = LearnerGroup(config, self.rollout_workers, recorder.run.uri, start_version=state.epoch,
                                    resume_from=resume_from)
        self._wait_until_started()
        self.recovery = Recovery(self.rollout_workers, self.reward_workers, config, [r.name for r in config.rewards])
        if initial_weights is not None:  # resuming: rollouts start from the checkpoint's LoRA
            self.recovery.set_weights(state.epoch, initial_weights)
            version, weights = self.recovery.weights
            ray.get([w.set_weights.remote(version, weights) for w in self.rollout_workers])
        self.prometheus = DriverMetrics(config, self.rollout_workers)  # Prometheus, via Ray's metrics agent
        self.watch = HeldoutWatch(config, recorder.run)  # held-out evaluations, guards, best.json
        self.heldout = HeldoutEvaluation(config, self.rollout_workers, self.reward_workers) if self.watch.enabled else None
        self.stopped_by: str | None = None  # why the run stopped early: a guard's line, or on_epoch's

    def _wait_until_started(self) -> None:
        """A constructor that fails (a model not on disk, LoRA modules that match nothing, a reward's
        weights that do not load) stops the run here, within seconds, with its cause in one line."""
        try:
            wait_until_started(
                {"rollout": self.rollout_workers, "reward": self.reward_workers},
                hint={"rollout": f"check model.pretrained={self.config.model.pretrained!r} and lora.*",
                      "reward": "check rewards[].name and rewards[].path"},
            )
        except BaseException:
            self.learner.close()
            for actor in self.rollout_workers + self.reward_workers:  # a Ray session shared with others keeps going
                ray.kill(actor)
            raise

    # ------------------------------------------------------------------ one stage each

    def sample(self, epoch: int) -> list[RolloutBatch]:
        """prompts -> RolloutWorkers: one batch (an ObjectRef of Trajectories) per call, round-robin."""
        batches = []
        for index, (prompts, seed) in enumerate(epoch_batches(self.config, self.prompts, epoch)):
            batch = RolloutBatch(epoch, index, prompts, seed, worker=index % len(self.rollout_workers))
            self.recovery.issue(batch)
            batches.append(batch)
        return batches

    def score(self, batches: list[RolloutBatch]) -> list[ScoredBatch]:
        """Trajectories -> RewardWorkers: rewards and per-step credit weights (the heavy tensors stay put).
        Lost rollout batches are issued again and failed reward calls retried (Recovery)."""
        scored = self.recovery.score(batches, while_waiting=self.prometheus.count_stages)
        self.prometheus.scoring_done()
        return scored

    def advantages(self, epoch: int, scored: list[ScoredBatch]) -> tuple[torch.Tensor, list[int], dict]:
        """Per-prompt normalisation of rewards, then of the shaped step rewards (both stages here,
        because the trackers must see every sample of the epoch). Samples with a NaN or infinite
        reward are left out of the update and of the statistics, and samples whose advantages are all
        zero out of the update: returns the step advantages of the kept samples, their indices in the
        epoch, and the info."""
        prompts = [p for batch in scored for p in batch.prompts]
        rewards = torch.cat([batch.scores.rewards for batch in scored])
        weights = None if scored[0].scores.step_weights is None else torch.cat([b.scores.step_weights for b in scored])
        good = finite_rewards(rewards, epoch)
        step_advantages, info = epoch_advantages(
            self.config, self.state.reward_tracker, self.state.step_tracker,
            [p for p, ok in zip(prompts, good.tolist()) if ok], rewards[good], None if weights is None else weights[good],
        )
        signal = rows_with_signal(step_advantages, min_rows=self.config.cluster.num_learner_workers)
        rows = torch.nonzero(good).flatten()[signal].tolist()
        info |= {"bad_rewards": len(rewards) - int(good.sum()), "zero_rows": int((~signal).sum())}
        return step_advantages[signal], rows, info

    def refresh_stale(self, epoch: int, batches: list[RolloutBatch], scored: list[ScoredBatch]) -> list[ScoredBatch]:
        """Sample again any batch more than max_policy_lag versions behind the learner: in async mode
        an old one, in either mode one from a rollout actor that restarted with its initial weights."""
        max_lag = self.config.cluster.max_policy_lag
        for i, batch in enumerate(scored):
            lag = epoch - batch.policy_version
            if lag > max_lag:
                self.recovery.reissue(batches[i], f"{lag} versions old (bound {max_lag})")
                scored[i] = self.score([batches[i]])[0]
        return scored

    def rescore(self, epoch: int, batches: list[RolloutBatch], scored: list[ScoredBatch]):
        """Async mode: the learner (at version `epoch`) needs each stale batch's log-probs under its own
        weights. The rollout actors hold those weights already and are idle until the next epoch is
        sampled, so they compute them, queued before that sampling, while the learner trains
        (dense_rl/training/update.py). Returns `ask([(batch index, rows), ...])` -> the ObjectRef of those rows'
        [rows, T] log-probs, for LearnerGroup.submit to call in the order the ranks need them, each call
        to the next rollout actor in turn; None when every batch is on-policy."""
        if all(batch.policy_version >= epoch for batch in scored):
            return None
        workers = itertools.cycle(self.rollout_workers)

        def ask(pieces: list[tuple[int, list[int]]]):
            return next(workers).rescore.remote([(batches[index].ref, rows) for index, rows in pieces], epoch)

        return ask

    def evaluate_base(self) -> None:
        """The base model's held-out scores, once per model, held-out set and rewards (cached beside the runs)."""
        if self.heldout is not None and self.watch.base is None:
            evaluated = HeldoutEvaluation.collect(self.heldout.issue(base=True))
            if evaluated is None:
                raise RunFailed("evaluation: the base model's held-out evaluation failed; the guards need it")
            self.watch.record_base(evaluated[0])

    def check_guards(self, epoch: int, issued) -> Verdict | None:
        """The held-out evaluation of the policy this epoch made: its rows, grid and telemetry, the guards."""
        evaluated = HeldoutEvaluation.collect(issued)
        if evaluated is None:
            return None
        scores, preview, seconds = evaluated
        verdict = self.watch.check(scores, epoch=epoch, policy_version=self.state.epoch, samples=self.state.samples_seen)
        self.recorder.record_heldout_images(epoch, preview)
        self.prometheus.heldout_evaluated(verdict.scores, self.state.samples_seen)
        log.info("held-out evaluation of policy version %d: %.1f s", self.state.epoch, seconds)
        return verdict

    # ------------------------------------------------------------------ the loop

    def run(self, show_progress: bool = True, on_epoch=None) -> list[dict]:
        """Run to config.run.num_epochs; `on_epoch(driver, metrics)` is called after each epoch and may
        end the run there by setting `driver.stopped_by` to the reason."""
        config, state = self.config, self.state
        asynchronous = config.cluster.max_policy_lag >= 1
        bar = tqdm(total=config.run.num_epochs, initial=state.epoch, desc="epochs", unit="epoch",
                   disable=not show_progress, dynamic_ncols=True)
        self.evaluate_base()
        pending = self.sample(state.epoch) if state.epoch < config.run.num_epochs else None
        try:
            for epoch in range(state.epoch, config.run.num_epochs):
                started = time.perf_counter()
                self.prometheus.epoch_started()
                batches = pending
                scored = self.score(batches)
                self.prometheus.batches_arrived(epoch, scored, [batch.worker for batch in batches])
                sampled_and_scored = time.perf_counter()
                scored = self.refresh_stale(epoch, batches, scored)
                step_advantages, rows, advantage_info = self.advantages(epoch, scored)
                self.learner.submit(epoch, [batch.ref for batch in batches], step_advantages, rows,
                                    rescore=self.rescore(epoch, batches, scored))
                self.prometheus.submitted(len(batches))
                pending = None
                if asynchronous and epoch + 1 < config.run.num_epochs:
                    pending = self.sample(epoch + 1)  # overlaps the learner's update
                result = self.learner.wait(epoch)
                self.recovery.set_weights(result.version, result.weights[0])
                # The held-out set goes to the rollouts before the next epoch's batches, on these weights.
                evaluating = self.heldout.issue(self.recovery.weights) if self.watch.due(result.version) else None
                if not asynchronous and epoch + 1 < config.run.num_epochs:
                    pending = self.sample(epoch + 1)
                learned = time.perf_counter()

                state.epoch = epoch + 1
                state.samples_seen += sum(len(b.prompts) for b in scored)
                timings = {"sample_and_score": sampled_and_scored - started, "learn_and_sync": learned - sampled_and_scored}
                verdict = self.check_guards(epoch, evaluating) if evaluating is not None else None
                if evaluating is not None:
                    timings["heldout"] = time.perf_counter() - learned
                metrics = epoch_metrics(epoch, state, scored, advantage_info, result.metrics, timings=timings)
                if verdict is not None and verdict.stop:
                    metrics["stopped_by"] = self.stopped_by = verdict.stop
                state.history.append(metrics)
                self.prometheus.epoch_finished(epoch, scored, result.metrics)
                self.recorder.record_epoch(epoch, state, scored, metrics, checkpoint=result.checkpoint)
                if verdict is not None:
                    self.watch.keep_if_best(verdict, result.checkpoint)
                bar.update(1)
                bar.set_postfix(samples=state.samples_seen, reward=f"{metrics['reward_mean']:.3f}",
                                samples_per_s=f"{metrics['samples_per_second']:.1f}")
                log.info(self.recorder.epoch_line(metrics))
                if on_epoch is not None:
                    on_epoch(self, metrics)
                if self.stopped_by is not None:
                    break
        finally:
            bar.close()
            self.learner.close()
            for actor in self.rollout_workers + self.reward_workers:  # a Ray session shared with others keeps going
                ray.kill(actor)
        return state.history
