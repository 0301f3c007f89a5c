"""What travels between the roles: a batch of denoising trajectories (and the prompt embeddings the
denoiser is conditioned on). Plain tensors and torch only, so a role that only reads trajectories (the
reward actor) need not import diffusers."""

from __future__ import annotations

from dataclasses import dataclass, fields

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



@dataclass
class Trajectories:
    """A batch of B denoising trajectories of T steps, on CPU between roles.

    `latents[:, k]` is the state before step k (k = 0 is pure noise) and `latents[:, k + 1]` the action
    taken; `latents[:, T]` is the final sample. `x0_preds[:, k]` is the model's predicted clean sample
    at step k, which CoCA compares with the final one. Only the steps in `sde_window` [start, stop)
    were stochastic and have log-probs (the others are ODE steps, log-prob 0); PPO trains those.
    """

    prompts: list[str]
    prompt_embeds: torch.Tensor  # [B, L, D]
    negative_prompt_embeds: torch.Tensor | None  # [B, L, D]; None without classifier-free guidance
    timesteps: torch.Tensor  # [T], shared by every row
    latents: torch.Tensor  # [B, T + 1, C, H, W]
    log_probs: torch.Tensor  # [B, T], under the policy that sampled them
    x0_preds: torch.Tensor  # [B, T, C, H, W]
    images: torch.Tensor  # [B, 3, H', W'] float32 in [0, 1]
    policy_version: int = 0
    # Flow transformers (SD3) also condition on pooled text embeddings [B, P]; None for UNets.
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None
    sde_window: tuple[int, int] | None = None  # None: every step

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
    def trained_steps(self) -> range:
        """The steps with log-probs, which PPO trains."""
        start, stop = self.sde_window or (0, self.num_steps)
        return range(start, stop)

    def embeds(self, rows, device, dtype) -> tuple[PromptEmbeds, PromptEmbeds | None]:
        """The prompt (and negative prompt) embeddings of `rows`, on `device` in `dtype`."""
        def take(embeds, pooled):
            if embeds is None:
                return None
            return PromptEmbeds(embeds[rows].to(device, dtype), None if pooled is None else pooled[rows].to(device, dtype))
        return (take(self.prompt_embeds, self.pooled_prompt_embeds),
                take(self.negative_prompt_embeds, self.negative_pooled_prompt_embeds))

    def select(self, rows) -> "Trajectories":
        """The trajectories at `rows` (a list, slice or index tensor)."""
        rows = torch.as_tensor(rows) if not isinstance(rows, slice) else rows
        prompts = self.prompts[rows] if isinstance(rows, slice) else [self.prompts[int(i)] for i in rows]
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in values.items():
            if isinstance(value, torch.Tensor) and name != "timesteps":
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
            elif f.name in ("timesteps", "sde_window"):
                values[f.name] = getattr(first, f.name)
            elif f.name == "policy_version":
                values[f.name] = min(parts)
            elif parts[0] is None:
                values[f.name] = None
            else:
                values[f.name] = torch.cat(parts)
        return Trajectories(**values)
