"""The whole algorithm in one process: sample -> reward -> credit -> advantages -> PPO.

This is the reference the Ray system is measured against (same functions, no distribution), and the
quickest way to read what one epoch does. It draws the same prompts and noise as the driver, leaves
out samples with a NaN/inf reward the same way, and shuffles as learner rank 0 of 1 does
(`update_seed`), so a run with one learner worker can be compared with it exactly.
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from dense_rl.config import Config
from dense_rl.diffusion.pipeline import build_policy, denoiser
from dense_rl.diffusion.sampler import sample_trajectories
from dense_rl.diffusion.trajectories import RewardInputs, Trajectories, to_uint8
from dense_rl.rewards import WeightedRewards
from dense_rl.run.checkpoints import (
    checkpoint_due,
    checkpoint_name,
    keep_newest,
    load_resume_point,
    new_driver_state,
    restore_learner,
    session_folder,
    write_learner_files,
)
from dense_rl.run.records import RunRecorder, epoch_metrics
from dense_rl.run.registry import RunTracker
from dense_rl.run.storage import RunDir
from dense_rl.training.guards import HeldoutWatch, Verdict
from dense_rl.training.heldout import evaluate_policy, extra_reward_specs, heldout_set
from dense_rl.training.monitors import image_monitors
from dense_rl.training.prompts import load_prompts
from dense_rl.training.recipe import (
    epoch_advantages,
    epoch_batches,
    evaluation_sampler_options,
    rows_with_signal,
    sample_batch,
    update_policy,
)
from dense_rl.training.scoring import ScoredBatch, Scores, finite_rewards, score_trajectories
from dense_rl.training.update import make_grad_scaler, make_optimizer


def sample_epoch(pipe, config: Config, prompts: list[str], epoch: int, version: int = 0):
    """The epoch's batches with the Ray driver's prompts and per-batch noise seeds, so the reference
    loop and the Ray system sample identical batches from identical weights."""
    return Trajectories.concat([sample_batch(pipe, config, batch_prompts, seed, version)
                                for batch_prompts, seed in epoch_batches(config, prompts, epoch)])


@torch.no_grad()
def evaluate(pipe, config: Config, rewards: WeightedRewards, prompts: list[str], seed: int,
             keep_images: list | None = None) -> dict[str, float]:
    """Mean of each reward over one fixed-seed sample per prompt (comparable across checkpoints); the
    uint8 images are appended to `keep_images` when a list is given."""
    generator = torch.Generator().manual_seed(seed)
    trajectories = sample_trajectories(pipe, prompts, **evaluation_sampler_options(config, pipe), generator=generator)
    images = to_uint8(trajectories.images)
    if keep_images is not None:
        keep_images.append(images)
    total, components = rewards(RewardInputs.as_float(images), trajectories.prompts)
    return {"reward": float(total.mean()), **{name: float(v.mean()) for name, v in components.items()}}


def credit_profile(cosines: torch.Tensor, step_weights: torch.Tensor | None) -> dict[str, list[float]]:
    """Per denoising step, over the epoch's samples: the mean cosine to the final sample and the mean
    and spread of the step weights (none for sparse credit); what the benchmarks plot."""
    profile = {"cosine_mean_per_step": cosines.mean(0).tolist()}
    if step_weights is not None:
        profile |= {"step_weight_mean_per_step": step_weights.mean(0).tolist(),
                    "step_weight_std_per_step": step_weights.std(0).tolist()}
    return profile


def train(config: Config, *, run_uri: str | None = None, show_progress: bool = True, keep_policy: dict | None = None,
          on_epoch=None) -> list[dict]:
    """Train in this process; returns one metrics row per epoch (the row metrics.parquet holds, plus the
    stage timings and credit profile the benchmarks read).

    With `run_uri` the run directory is written as the Ray system writes it (config, metrics, samples,
    images, checkpoints, latest.json, the registry record), and a run already there is resumed from its
    newest checkpoint. With `evaluation.every_epochs`, the policy is evaluated on the held-out set (and the
    base model once), the guards are checked, and a guard whose action is stop ends the run: its line is
    the last row's `stopped_by`. `keep_policy["pipe"]` receives the trained pipeline when a dict is given;
    `on_epoch(metrics)` is called after each epoch."""
    torch.manual_seed(config.run.seed)
    run = RunDir(run_uri) if run_uri is not None else None
    state, _, resume_from = load_resume_point(run, config) if run is not None else (new_driver_state(config), None, None)

    pipe, params = build_policy(config)
    if keep_policy is not None:
        keep_policy["pipe"] = pipe
    model = denoiser(pipe)
    optimizer = make_optimizer(params, config.train)
    if resume_from is not None:
        restore_learner(run.child(resume_from), model, optimizer, config.train)
    grad_scaler = make_grad_scaler(model)
    rewards = WeightedRewards(config.rewards, device=config.model.device)
    prompts = load_prompts(config.sample.prompts)
    recorder = tracker = None
    if run is not None:
        recorder = RunRecorder(run, config)
        recorder.write_config(start_epoch=state.epoch)
        tracker = RunTracker.start(config, run.uri, state)
        session = session_folder(state.epoch)
    heldout = InProcessHeldout(config, run, pipe, rewards) if config.evaluation.every_epochs else None

    asynchronous, pending = config.cluster.max_policy_lag == 1, None
    bar = tqdm(range(state.epoch, config.run.num_epochs), desc="epochs", disable=not show_progress)
    try:
        for epoch in bar:
            started = time.perf_counter()
            # Sync: sampled by the weights of this epoch. Async, as in the Ray driver: sampled before the
            # previous update, by the weights one version behind (ppo_update corrects for it).
            trajectories = pending if pending is not None else sample_epoch(pipe, config, prompts, epoch, version=epoch)
            sampled = time.perf_counter()
            scores = score_trajectories(rewards, trajectories.for_reward(), config.credit)
            scored = time.perf_counter()
            good = finite_rewards(scores.rewards, epoch)  # NaN/inf rewards: left out of the update
            rows = torch.nonzero(good).flatten()
            kept = trajectories.select(rows)
            weights = None if scores.step_weights is None else scores.step_weights[good]
            step_advantages, advantage_info = epoch_advantages(config, state.reward_tracker, state.step_tracker,
                                                               kept.prompts, scores.rewards[good], weights)
            signal = rows_with_signal(step_advantages, min_rows=1)  # all-zero rows teach nothing
            kept, step_advantages = kept.select(torch.nonzero(signal).flatten()), step_advantages[signal]
            credited = time.perf_counter()
            if asynchronous and epoch + 1 < config.run.num_epochs:
                pending = sample_epoch(pipe, config, prompts, epoch + 1, version=epoch)
            sampled_ahead = time.perf_counter()
            update_info = update_policy(model, pipe.scheduler, optimizer, params, kept, step_advantages, config,
                                        epoch=epoch, grad_scaler=grad_scaler)
            updated = time.perf_counter()

            state.epoch, state.samples_seen = epoch + 1, state.samples_seen + trajectories.batch_size
            batches = scored_batches(trajectories, scores, config.sample.batch_size)
            # Stage timings: the benchmarks read what credit assignment costs from these.
            timings = {"sample": (sampled - started) + (sampled_ahead - credited), "score": scored - sampled,
                       "advantages": credited - scored, "update": updated - sampled_ahead}
            advantage_info |= {"bad_rewards": len(good) - len(rows), "zero_rows": int((~signal).sum())}
            verdict = None
            if heldout is not None and heldout.watch.due(state.epoch):
                verdict = heldout.evaluate(epoch, state)
                timings["heldout"] = time.perf_counter() - updated
            metrics = epoch_metrics(epoch, state, batches, advantage_info, update_info, timings)
            metrics |= credit_profile(trajectories.cosines[good], weights)
            if verdict is not None and verdict.stop:
                metrics["stopped_by"] = verdict.stop
            state.history.append(metrics)
            checkpoint = None
            if run is not None:
                if checkpoint_due(state.epoch, config.run):
                    checkpoint = f"{session}/{checkpoint_name(state.epoch)}"
                    write_learner_files(run.child(checkpoint), model, optimizer)
                recorder.record_epoch(epoch, state, batches, metrics, checkpoint=checkpoint)
                if verdict is not None:
                    heldout.watch.keep_if_best(verdict, checkpoint)
                if checkpoint is not None:
                    keep_newest(run, session, config.checkpoint.keep)
                tracker.record_epoch(run, metrics)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{update_info.get('approx_kl', 0):.2e}")
            if on_epoch is not None:
                on_epoch(metrics)
            if "stopped_by" in metrics:
                break
    except BaseException as error:
        if tracker is not None:
            tracker.finish("failed", error)
        raise
    if tracker is not None:
        tracker.finish("stopped" if "stopped_by" in state.history[-1] else "finished",
                       message=state.history[-1].get("stopped_by"))
    return state.history


class InProcessHeldout:
    """The held-out evaluation of the in-process trainer: the held-out set sampled here, with the policy's
    adapters on (or, once, off: the base model), scored by the trained and the extra rewards."""

    def __init__(self, config: Config, run: RunDir | None, pipe, rewards: WeightedRewards):
        extra = extra_reward_specs(config)
        self.config, self.run, self.pipe, self.rewards = config, run, pipe, rewards
        self.extra = WeightedRewards(extra, device=config.model.device) if extra else None
        self.held_out = heldout_set(config)
        self.watch = HeldoutWatch(config, run)
        if self.watch.base is None:
            model = denoiser(pipe)
            model.disable_adapters()
            try:
                self.watch.record_base(self._scores())
            finally:
                model.enable_adapters()

    def _scores(self) -> list:
        scores, preview = evaluate_policy(self.pipe, self.config, self.rewards, self.extra, self.held_out)
        self.preview = preview
        return scores

    def evaluate(self, epoch: int, state) -> Verdict:
        verdict = self.watch.check(self._scores(), epoch=epoch, policy_version=state.epoch, samples=state.samples_seen)
        if self.run is not None:
            RunRecorder(self.run, self.config).record_heldout_images(epoch, self.preview)
        return verdict


def scored_batches(trajectories: Trajectories, scores, rows_per_batch: int, preview_count: int = 8) -> list[ScoredBatch]:
    """The epoch's scores cut into its rollout batches, as the Ray system's reward role returns them (the
    first `preview_count` images of each batch for the epoch's grid)."""
    batches = []
    for start in range(0, trajectories.batch_size, rows_per_batch):
        part = slice(start, start + rows_per_batch)
        step_weights = None if scores.step_weights is None else scores.step_weights[part]
        fallbacks = scores.num_fallbacks if start == 0 else 0  # counted once, for the epoch
        batch_scores = Scores(scores.rewards[part], {name: v[part] for name, v in scores.components.items()},
                              step_weights, fallbacks, scores.boundary_model_calls,
                              scores.boundary_seconds * len(trajectories.prompts[part]) / trajectories.batch_size)
        preview = to_uint8(trajectories.images[start:start + min(preview_count, rows_per_batch)])
        monitors = image_monitors(to_uint8(trajectories.images[part]), trajectories.prompts[part])
        batches.append(ScoredBatch(trajectories.prompts[part], trajectories.policy_version, batch_scores, preview,
                                   monitors))
    return batches
