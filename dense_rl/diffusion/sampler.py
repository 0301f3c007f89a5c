"""Prompts -> trajectories: DDIM(eta) sampling that records everything PPO and CoCA need."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from diffusers import StableDiffusionPipeline
from tqdm.auto import tqdm

from dense_rl.diffusion.ddim import ddim_step_with_logprob
from dense_rl.diffusion.pipeline import decode_to_images, encode_prompts, latent_shape


@dataclass
class Trajectories:
    """A batch of B denoising trajectories of T steps, on CPU between roles.

    `latents[:, k]` is the state before step k (k = 0 is pure noise) and `latents[:, k + 1]` the action
    taken; `latents[:, T]` is the final sample. `x0_preds[:, k]` is the model's predicted clean sample
    at step k, which CoCA compares with the final one.
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

    @property
    def batch_size(self) -> int:
        return len(self.prompts)

    @property
    def num_steps(self) -> int:
        return self.log_probs.shape[1]

    @property
    def final_samples(self) -> torch.Tensor:
        return self.latents[:, -1]

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
        values = {}
        for f in fields(Trajectories):
            parts = [getattr(b, f.name) for b in batches]
            if f.name == "prompts":
                values[f.name] = [p for part in parts for p in part]
            elif f.name == "timesteps":
                values[f.name] = first.timesteps
            elif f.name == "policy_version":
                values[f.name] = min(parts)
            elif parts[0] is None:
                values[f.name] = None
            else:
                values[f.name] = torch.cat(parts)
        return Trajectories(**values)


def predict_noise(
    unet,
    samples: torch.Tensor,
    timesteps: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor | None,
    guidance_scale: float,
) -> torch.Tensor:
    """The UNet's output with classifier-free guidance; `timesteps` is one per row or a scalar."""
    if negative_prompt_embeds is None or guidance_scale == 1.0:
        return unet(samples, timesteps, encoder_hidden_states=prompt_embeds).sample
    timesteps = torch.as_tensor(timesteps, device=samples.device)
    if timesteps.ndim == 1:
        timesteps = torch.cat([timesteps, timesteps])
    both = unet(
        torch.cat([samples, samples]), timesteps,
        encoder_hidden_states=torch.cat([negative_prompt_embeds, prompt_embeds]),
    ).sample
    unconditional, conditional = both.chunk(2)
    return unconditional + guidance_scale * (conditional - unconditional)


@torch.no_grad()
def sample_trajectories(
    pipe: StableDiffusionPipeline,
    prompts: list[str],
    *,
    num_steps: int,
    guidance_scale: float,
    eta: float = 1.0,
    negative_prompt: str = "",
    generator: torch.Generator | None = None,
    policy_version: int = 0,
    show_progress: bool = False,
) -> Trajectories:
    """Sample one trajectory per prompt. Seeded by `generator` (a CPU generator keeps runs
    reproducible across devices: noise is drawn on the CPU and moved)."""
    if len(prompts) == 0:
        raise ValueError("prompts is empty: pass at least one prompt")
    device, dtype = pipe.unet.device, pipe.unet.dtype
    batch_size = len(prompts)
    prompt_embeds = encode_prompts(pipe, prompts).to(dtype)
    negative_prompt_embeds = None
    if guidance_scale > 1.0:
        negative_prompt_embeds = encode_prompts(pipe, [negative_prompt] * batch_size).to(dtype)

    scheduler = pipe.scheduler
    scheduler.set_timesteps(num_steps, device=device)
    channels, height, width = latent_shape(pipe)
    sample = torch.randn((batch_size, channels, height, width), generator=generator, dtype=torch.float32)
    sample = (sample * scheduler.init_noise_sigma).to(device, dtype)

    all_samples, all_log_probs, all_x0 = [sample], [], []
    for t in tqdm(scheduler.timesteps, desc="denoising", disable=not show_progress, leave=False):
        model_input = scheduler.scale_model_input(sample, t)
        noise_pred = predict_noise(pipe.unet, model_input, t, prompt_embeds, negative_prompt_embeds, guidance_scale)
        sample, log_prob, x0_pred = ddim_step_with_logprob(scheduler, noise_pred, t, sample, eta, generator=generator)
        all_samples.append(sample)
        all_log_probs.append(log_prob)
        all_x0.append(x0_pred)

    return Trajectories(
        prompts=list(prompts),
        prompt_embeds=prompt_embeds.cpu(),
        negative_prompt_embeds=None if negative_prompt_embeds is None else negative_prompt_embeds.cpu(),
        timesteps=scheduler.timesteps.cpu(),
        latents=torch.stack(all_samples, dim=1).cpu(),
        log_probs=torch.stack(all_log_probs, dim=1).float().cpu(),
        x0_preds=torch.stack(all_x0, dim=1).cpu(),
        images=decode_to_images(pipe, sample),
        policy_version=policy_version,
    )
