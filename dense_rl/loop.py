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

from dense_rl.advantages import compute_step_advantages
from dense_rl.config import Config
from dense_rl.diffusion.pipeline import compile_denoiser, denoiser, load_pipeline
from dense_rl.diffusion.sampler import sample_trajectories, sampler_options
from dense_rl.diffusion.trajectories import RewardInputs, Trajectories, to_uint8
from dense_rl.lora import add_lora, load_lora_state_dict, read_lora_file
from dense_rl.prompts import choose_prompts, load_prompts
from dense_rl.rewards import WeightedRewards
from dense_rl.scoring import finite_rewards, score_trajectories
from dense_rl.seeds import batch_seed, prompt_rng, update_seed
from dense_rl.stats import PerPromptStatTracker
from dense_rl.update import make_grad_scaler, make_optimizer, ppo_update


def build_policy(config: Config):
    """The frozen pipeline with a trainable LoRA adapter; returns (pipe, lora_params)."""
    pipe = load_pipeline(
        config.model.pretrained, dtype=config.model.dtype, device=config.model.device, revision=config.model.revision
    )
    # Seeded so every process (rollouts, each learner rank, a resumed run) builds the same adapter.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.run.seed)
        params = add_lora(denoiser(pipe), config.lora.rank, config.lora.alpha, config.lora.target_modules)
    if config.lora.init_from:
        load_lora_state_dict(denoiser(pipe), read_lora_file(config.lora.init_from))
    if config.model.compile:
        compile_denoiser(pipe, config.model.device)
    return pipe, params


def sample_epoch(pipe, config: Config, prompts: list[str], epoch: int, version: int = 0):
    """The epoch's batches with the Ray driver's prompts and per-batch noise seeds, so the reference
    loop and the Ray system sample identical batches from identical weights."""
    sample, seed = config.sample, config.run.seed
    rng = prompt_rng(seed, epoch)
    batches = []
    for batch in range(sample.num_batches_per_epoch):
        prompts_of_batch = choose_prompts(rng, prompts, sample.batch_size, sample.samples_per_prompt)
        batches.append(sample_trajectories(
            pipe, prompts_of_batch, **sampler_options(sample, config.credit),
            generator=torch.Generator().manual_seed(batch_seed(seed, epoch, batch)), policy_version=version,
        ))
    return Trajectories.concat(batches)


@torch.no_grad()
def evaluate(pipe, config: Config, rewards: WeightedRewards, prompts: list[str], seed: int,
             keep_images: list | None = None) -> dict[str, float]:
    """Mean of each reward over one fixed-seed sample per prompt (comparable across checkpoints); the
    uint8 images are appended to `keep_images` when a list is given."""
    generator = torch.Generator().manual_seed(seed)
    trajectories = sample_trajectories(pipe, prompts, **sampler_options(config.sample), generator=generator)
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


def train(config: Config, *, show_progress: bool = True, keep_policy: dict | None = None) -> list[dict[str, float]]:
    """Train in this process; returns one metrics dict per epoch (and the trained pipeline in
    keep_policy["pipe"] when a dict is given)."""
    torch.manual_seed(config.run.seed)

    pipe, params = build_policy(config)
    if keep_policy is not None:
        keep_policy["pipe"] = pipe
    optimizer = make_optimizer(params, config.train)
    grad_scaler = make_grad_scaler(denoiser(pipe))
    rewards = WeightedRewards(config.rewards, device=config.model.device)
    prompts = load_prompts(config.sample.prompts)
    reward_tracker = PerPromptStatTracker(config.credit.buffer_size, config.credit.min_count)
    step_tracker = PerPromptStatTracker(config.credit.buffer_size, config.credit.min_count)

    history = []
    asynchronous, pending = config.cluster.max_policy_lag == 1, None
    bar = tqdm(range(config.run.num_epochs), desc="epochs", disable=not show_progress)
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
        step_advantages, advantage_info = compute_step_advantages(
            kept.prompts, scores.rewards[good].numpy(), weights,
            credit_mode=config.credit.mode, num_steps=config.sample.num_steps,
            reward_tracker=reward_tracker, step_tracker=step_tracker,
            temporal_alpha=config.credit.temporal_alpha, adv_clip_max=config.train.adv_clip_max,
            window_size=config.credit.window_size, advantages=config.credit.advantages,
            group_std=config.credit.group_std,
        )
        credited = time.perf_counter()
        if asynchronous and epoch + 1 < config.run.num_epochs:
            pending = sample_epoch(pipe, config, prompts, epoch + 1, version=epoch)
        sampled_ahead = time.perf_counter()
        update_info = ppo_update(
            denoiser(pipe), pipe.scheduler, optimizer, params, kept, step_advantages, config.train,
            eta=config.sample.eta, noise_level=config.sample.sde_noise_level, guidance_scale=config.sample.guidance_scale,
            generator=torch.Generator().manual_seed(update_seed(config.run.seed, epoch, rank=0)),
            learner_version=epoch, grad_scaler=grad_scaler,
        )
        updated = time.perf_counter()
        metrics = {
            "epoch": epoch,
            "reward_mean": float(scores.rewards[good].mean()),
            "reward_std": float(scores.rewards[good].std()),
            "bad_rewards": len(good) - len(rows),
            "credit_fallbacks": scores.num_fallbacks,
            "epoch_seconds": updated - started,
            # Stage timings: the benchmarks read what credit assignment costs from these.
            "seconds_sample": (sampled - started) + (sampled_ahead - credited),
            "seconds_score": scored - sampled,
            "seconds_advantages": credited - scored,
            "seconds_update": updated - sampled_ahead,
            **{f"reward/{name}": float(v[torch.isfinite(v)].mean()) for name, v in scores.components.items()},
            **{f"advantage/{k}": float(v) for k, v in advantage_info.items()},
            **update_info,
            **credit_profile(trajectories.cosines[good], weights),
        }
        history.append(metrics)
        bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{update_info.get('approx_kl', 0):.2e}")
    return history
