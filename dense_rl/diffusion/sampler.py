"""Prompts -> trajectories: stochastic sampling (DDIM(eta), or the flow SDE) that records everything
PPO and CoCA need. The family comes with the pipeline (dense_rl.diffusion.policy)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from tqdm.auto import tqdm

from dense_rl.diffusion.pipeline import PromptEmbeds, decode_to_images, denoiser, encode_prompts, latent_shape
from dense_rl.diffusion.policy import StepPolicy, guided_model_output


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


def sampler_options(sample) -> dict:
    """sample_trajectories' keyword arguments from a SampleConfig (every caller samples alike)."""
    return dict(num_steps=sample.num_steps, guidance_scale=sample.guidance_scale, eta=sample.eta,
                noise_level=sample.sde_noise_level, sde_window=sample.sde_window, negative_prompt=sample.negative_prompt,
                resolution=sample.resolution)


@torch.no_grad()
def sample_trajectories(
    pipe,
    prompts: list[str],
    *,
    num_steps: int,
    guidance_scale: float,
    eta: float = 1.0,
    noise_level: float = 0.7,
    sde_window: tuple[int, int] | list[int] | None = None,
    negative_prompt: str = "",
    resolution: int | None = None,
    generator: torch.Generator | None = None,
    policy_version: int = 0,
    show_progress: bool = False,
) -> Trajectories:
    """Sample one trajectory per prompt with `pipe` (SD 1.x/2.x: DDIM(eta); SD3: the flow SDE at
    `noise_level`), stochastic on the steps in `sde_window` and ODE elsewhere, at `resolution` pixels
    (None: the model's own size). Seeded by
    `generator` (a CPU generator keeps runs reproducible across devices: noise is drawn on the CPU)."""
    if len(prompts) == 0:
        raise ValueError("prompts is empty: pass at least one prompt")
    model = denoiser(pipe)
    device, dtype = model.device, model.dtype
    batch_size = len(prompts)
    window = tuple(sde_window) if sde_window else None
    stochastic = range(*window) if window else range(num_steps)
    embeds = encode_prompts(pipe, prompts).to(dtype)
    negative = None
    if guidance_scale > 1.0:
        negative = encode_prompts(pipe, [negative_prompt] * batch_size).to(dtype)

    policy = StepPolicy(pipe.scheduler, eta=eta, noise_level=noise_level)
    timesteps = policy.set_timesteps(num_steps, device)
    channels, height, width = latent_shape(pipe, resolution)
    sample = torch.randn((batch_size, channels, height, width), generator=generator, dtype=torch.float32)
    sample = (sample * getattr(pipe.scheduler, "init_noise_sigma", 1.0)).to(device, dtype)

    all_samples, all_log_probs, all_x0 = [sample], [], []
    for k in tqdm(range(num_steps), desc="denoising", disable=not show_progress, leave=False):
        step_index = torch.full((batch_size,), k, dtype=torch.long)
        output = guided_model_output(model, sample, timesteps[k].expand(batch_size), embeds, negative, guidance_scale)
        if k in stochastic:
            sample, log_prob, x0_pred = policy.step(output, step_index, sample, generator=generator)
        else:
            sample, x0_pred = policy.ode_step(output, step_index, sample)
            log_prob = torch.zeros(batch_size)
        all_samples.append(sample)
        all_log_probs.append(log_prob.float().cpu())
        all_x0.append(x0_pred)

    return Trajectories(
        prompts=list(prompts),
        prompt_embeds=embeds.embeds.cpu(),
        negative_prompt_embeds=None if negative is None else negative.embeds.cpu(),
        timesteps=timesteps.cpu(),
        latents=torch.stack(all_samples, dim=1).cpu(),
        log_probs=torch.stack(all_log_probs, dim=1),
        x0_preds=torch.stack(all_x0, dim=1).cpu(),
        images=decode_to_images(pipe, sample),
        policy_version=policy_version,
        pooled_prompt_embeds=None if embeds.pooled is None else embeds.pooled.cpu(),
        negative_pooled_prompt_embeds=None if negative is None or negative.pooled is None else negative.pooled.cpu(),
        sde_window=window,
    )
