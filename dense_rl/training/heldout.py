"""Held-out evaluation: a fixed set of prompts and noise (`evaluation:`), sampled by a policy and scored by
the trained rewards (and `trained`, their weighted sum: the objective) and by rewards the run does not
train on, plus the image monitors. The same for every policy, so the rows of two policy versions compare
like for like; the base model's are the rows of policy version 0."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dense_rl.config import Config, RewardSpec
from dense_rl.diffusion.trajectories import RewardInputs
from dense_rl.rewards import WeightedRewards
from dense_rl.training.monitors import monitor_values
from dense_rl.training.prompts import load_prompts

TRAINED = "trained"  # the row of the weighted sum of the trained rewards


def fixed_noise_batches(prompts: list[str], samples_per_prompt: int, batch_size: int, seed: int):
    """[(seed, [(prompt, sample_index), ...]), ...]: the same list, hence the same noise, for every policy."""
    items = [(prompt, k) for prompt in prompts for k in range(samples_per_prompt)]
    return [(seed + b, items[start : start + batch_size]) for b, start in enumerate(range(0, len(items), batch_size))]


@dataclass(frozen=True)
class HeldoutSet:
    prompts: list[str]
    batches: list  # fixed_noise_batches: (noise seed, [(prompt, sample index), ...]) per rollout call

    @property
    def size(self) -> int:
        return sum(len(items) for _, items in self.batches)


def heldout_set(config: Config) -> HeldoutSet:
    evaluation = config.evaluation
    prompts = load_prompts(evaluation.prompts)[: evaluation.max_prompts]
    return HeldoutSet(prompts, fixed_noise_batches(prompts, evaluation.samples_per_prompt, evaluation.batch_size,
                                                   evaluation.seed))


def extra_reward_specs(config: Config) -> list[RewardSpec]:
    """evaluation.rewards that the run does not train on (NAME or NAME=PATH), at weight 0."""
    trained = {spec.name for spec in config.rewards}
    extra = [text.partition("=") for text in config.evaluation.rewards]
    return [RewardSpec(name=name, weight=0.0, path=path or None) for name, _, path in extra if name not in trained]


def score_heldout(trained: WeightedRewards, extra: WeightedRewards | None, images: torch.Tensor,
                  prompts: list[str]) -> dict[str, torch.Tensor]:
    """Per image [B] of uint8 images: each trained reward and `trained` (their weighted sum), each extra
    reward, and the image monitors (image_diversity per prompt group instead)."""
    pixels = RewardInputs.as_float(images)
    total, components = trained(pixels, prompts)
    unseen = extra(pixels, prompts)[1] if extra is not None else {}
    return {**components, TRAINED: total, **unseen, **monitor_values(images, prompts)}


def heldout_rows(scores: list[dict[str, torch.Tensor]], *, epoch: int, policy_version: int, samples: int) -> list[dict]:
    """Rows of heldout.parquet from the scores of every batch of the held-out set: one per reward or
    monitor, its mean and std (population) over the images (over prompt groups for image_diversity)."""
    rows = []
    for name in scores[0]:
        values = torch.cat([batch[name] for batch in scores if name in batch]).float()
        rows.append({"epoch": epoch, "policy_version": policy_version, "samples": samples, "reward": name,
                     "mean": float(values.mean()), "std": float(values.std(unbiased=False))})
    return rows


@torch.no_grad()
def evaluate_policy(pipe, config: Config, trained: WeightedRewards, extra: WeightedRewards | None,
                    held_out: HeldoutSet, preview_count: int = 32) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
    """The scores of every batch of the held-out set sampled by `pipe` as it is (in-process), and its
    first `preview_count` images (uint8), for the evaluation's grid."""
    from dense_rl.diffusion.sampler import sample_trajectories
    from dense_rl.diffusion.trajectories import to_uint8
    from dense_rl.training.recipe import evaluation_sampler_options

    scores, images = [], []
    for seed, items in held_out.batches:
        prompts = [prompt for prompt, _ in items]
        trajectories = sample_trajectories(pipe, prompts, **evaluation_sampler_options(config, pipe),
                                           generator=torch.Generator().manual_seed(seed))
        images.append(to_uint8(trajectories.images))
        scores.append(score_heldout(trained, extra, images[-1], prompts))
    return scores, torch.cat(images)[:preview_count]
