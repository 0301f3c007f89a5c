"""What travels between the roles: a batch of denoising trajectories (and the prompt embeddings the
denoiser is conditioned on). Plain tensors and torch only, so a role that only reads trajectories (the
reward actor) need not import diffusers."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass(frozen=True)
class PromptEmbeds:
    """What the denoiser is conditioned on: token embeddings [B, L, D] (the UNet cross-attends to them;
    SD3's transformer attends jointly) and, for SD3, the pooled text embeddings [B, P]
    (`pooled_projections`); None for SD 1.x/2.x."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None

    def to(self, *args, **kwargs) -> "PromptEmbeds":
        """Both tensors moved/cast like `Tensor.to(*args, **kwargs)`."""
        return PromptEmbeds(self.embeds.to(*args, **kwargs),
                            None if self.pooled is None else self.pooled.to(*args, **kwargs))

    def __len__(self) -> int:
        return self.embeds.shape[0]

    @staticmethod
    def cat(parts: list["PromptEmbeds"]) -> "PromptEmbeds":
        """Concatenate along the batch."""
        pooled = [p.pooled for p in parts]
        if any(p is None for p in pooled) and not all(p is None for p in pooled):
            raise ValueError("cannot concatenate prompt embeddings with and without pooled embeddings")
        return PromptEmbeds(torch.cat([p.embeds for p in parts]), None if pooled[0] is None else torch.cat(pooled))



def trained_step_range(num_steps: int, sde_window, step_window) -> range:
    """The steps PPO trains: the stochastic ones (`sample.sde_window`, [start, stop); empty or None: all)
    within `train.step_window` (the same form)."""
    start, stop = sde_window or (0, num_steps)
    if step_window:
        start, stop = max(start, step_window[0]), min(stop, step_window[1])
    return range(start, stop)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float RGB images in [0, 1] -> uint8, as a saved PNG would hold them (a quarter of the bytes)."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


@dataclass
class RewardInputs:
    """What the reward role reads of a batch: the images (uint8), CoCA's cosine curve and, for
    `credit.mode: reward_gain`, the decoded predicted clean images at the window boundaries."""

    prompts: list[str]
    images: torch.Tensor  # uint8 [B, 3, H, W]
    cosines: torch.Tensor  # [B, T] float32: cos(x0_pred at step k, final sample)
    policy_version: int = 0
    boundary_images: torch.Tensor | None = None  # uint8 [B, J, 3, H, W]: the image at each window boundary
    boundary_model_calls: int = 0  # what making them cost the rollout: denoiser calls per trajectory
    boundary_seconds: float = 0.0  # and seconds, for the whole batch

    @staticmethod
    def as_float(images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> float32 in [0, 1], what the reward models take."""
        return images.float() / 255.0


@dataclass
class Trajectories:
    """A batch of B denoising trajectories of T steps, on CPU between roles.

    `latents[:, k]` is the state before step k (k = 0 is pure noise) and `latents[:, k + 1]` the action
    taken; `latents[:, T]` is the final sample. `cosines[:, k]` is the cosine between the model's
    predicted clean sample at step k and the final one (CoCA's input: the rollout computes it, so the
    predicted samples never travel). Only the steps in `sde_window` [start, stop) were stochastic and
    have log-probs (the others are ODE steps, log-prob 0); PPO trains those.

    The sampler fills every field; `for_learner()` and `for_reward()` are the two parts a rollout
    actor ships, as separate objects, so each role pulls only what it reads.
    """

    prompts: list[str]
    prompt_embeds: torch.Tensor  # [B, L, D]
    negative_prompt_embeds: torch.Tensor | None  # [1, L, D], shared by every row; None without guidance
    timesteps: torch.Tensor  # [T], shared by every row
    latents: torch.Tensor  # [B, T + 1, C, H, W]
    log_probs: torch.Tensor  # [B, T], under the policy that sampled them
    cosines: torch.Tensor | None = None  # [B, T] float32; None in the learner's part
    images: torch.Tensor | None = None  # [B, 3, H', W'] float32 in [0, 1]; None in the learner's part
    policy_version: int = 0
    # Flow transformers (SD3) also condition on pooled text embeddings [B, P] ([1, P] for the negative);
    # None for UNets.
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None
    sde_window: tuple[int, int] | None = None  # None: every step
    boundary_images: torch.Tensor | None = None  # [B, J, 3, H', W'] float32, for credit modes that score boundaries
    # What the boundary images cost the rollout: denoiser calls per trajectory (ODE completions) and seconds.
    boundary_model_calls: int = 0
    boundary_seconds: float = 0.0

    # Fields with one value for the whole batch, not one per row.
    SHARED = ("timesteps", "negative_prompt_embeds", "negative_pooled_prompt_embeds")

    @property
    def batch_size(self) -> int:
        return len(self.prompts)

    @property
    def num_steps(self) -> int:
        return self.log_probs.shape[1]

    @property
    def final_samples(self) -> torch.Tensor:
        return self.latents[:, -1]

    @property
    def stochastic_steps(self) -> range:
        """The steps with log-probs (`sde_window`), which PPO may train."""
        start, stop = self.sde_window or (0, self.num_steps)
        return range(start, stop)

    def for_learner(self) -> "Trajectories":
        """What PPO reads: states, actions, log-probs, timesteps and prompt embeddings."""
        return replace(self, cosines=None, images=None, boundary_images=None)

    def for_reward(self) -> RewardInputs:
        """What the reward role reads: 8-bit images, the cosine curve, boundary images if any."""
        return RewardInputs(list(self.prompts), to_uint8(self.images), self.cosines, self.policy_version,
                            None if self.boundary_images is None else to_uint8(self.boundary_images),
                            self.boundary_model_calls, self.boundary_seconds)

    def embeds(self, rows, device, dtype) -> tuple[PromptEmbeds, PromptEmbeds | None]:
        """The prompt (and negative prompt) embeddings of `rows`, on `device` in `dtype`."""
        positive = PromptEmbeds(self.prompt_embeds[rows].to(device, dtype),
                                None if self.pooled_prompt_embeds is None else self.pooled_prompt_embeds[rows].to(device, dtype))
        if self.negative_prompt_embeds is None:
            return positive, None
        count = len(positive)  # the one negative embedding, broadcast to the rows (no copy)
        negative = self.negative_prompt_embeds.to(device, dtype).expand(count, -1, -1)
        pooled = self.negative_pooled_prompt_embeds
        return positive, PromptEmbeds(negative, None if pooled is None else pooled.to(device, dtype).expand(count, -1))

    def to(self, device) -> "Trajectories":
        """Every tensor on `device` (dtypes kept): the learner moves each training batch once."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return Trajectories(**{name: value.to(device) if isinstance(value, torch.Tensor) else value
                               for name, value in values.items()})

    def select(self, rows) -> "Trajectories":
        """The trajectories at `rows` (a list, slice or index tensor)."""
        rows = torch.as_tensor(rows) if not isinstance(rows, slice) else rows
        prompts = self.prompts[rows] if isinstance(rows, slice) else [self.prompts[int(i)] for i in rows]
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in values.items():
            if isinstance(value, torch.Tensor) and name not in self.SHARED:
                values[name] = value[rows]
        return Trajectories(**{**values, "prompts": prompts})

    @staticmethod
    def concat(batches: list["Trajectories"]) -> "Trajectories":
        first = batches[0]
        if any(not torch.equal(b.timesteps, first.timesteps) for b in batches):
            raise ValueError("cannot concatenate trajectories sampled with different timestep schedules")
        if any(b.sde_window != first.sde_window for b in batches):
            raise ValueError("cannot concatenate trajectories sampled with different sde_window settings")
        values = {}
        for f in fields(Trajectories):
            parts = [getattr(b, f.name) for b in batches]
            if f.name == "prompts":
                values[f.name] = [p for part in parts for p in part]
            elif f.name in Trajectories.SHARED or f.name == "sde_window":
                values[f.name] = getattr(first, f.name)  # one run, one negative prompt: the same for every batch
            elif f.name == "policy_version":
                values[f.name] = min(parts)
            elif f.name == "boundary_model_calls":  # per trajectory: the same in every batch
                values[f.name] = first.boundary_model_calls
            elif f.name == "boundary_seconds":
                values[f.name] = sum(parts)
            elif parts[0] is None:
                values[f.name] = None
            else:
                values[f.name] = torch.cat(parts)
        return Trajectories(**values)
