"""Prompts -> trajectories: stochastic sampling (DDIM(eta), or the flow SDE) that records everything
PPO and CoCA need. The family comes with the pipeline (dense_rl.diffusion.policy)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from dense_rl.algo.credit import cosine_to_final, window_boundary_steps
from dense_rl.diffusion.pipeline import decode_to_images, denoiser, encode_prompts, latent_shape
from dense_rl.diffusion.policy import StepPolicy, guided_model_output
from dense_rl.diffusion.trajectories import PromptEmbeds, Trajectories


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
    decode_boundaries_every: int | None = None,
    generator: torch.Generator | None = None,
    policy_version: int = 0,
    show_progress: bool = False,
) -> Trajectories:
    """Sample one trajectory per prompt with `pipe` (SD 1.x/2.x: DDIM(eta); SD3: the flow SDE at
    `noise_level`), stochastic on the steps in `sde_window` and ODE elsewhere, at `resolution` pixels
    (None: the model's own size). Seeded by
    `generator` (a CPU generator keeps runs reproducible across devices: noise is drawn on the CPU).
    With `decode_boundaries_every=w` the predicted clean samples at steps 0, w, 2w, ... are decoded
    to images too (`reward_gain` credit scores them)."""
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
        negative = encode_prompts(pipe, [negative_prompt]).to(dtype)  # one row, broadcast to the batch

    policy = StepPolicy(pipe.scheduler, eta=eta, noise_level=noise_level)
    timesteps = policy.set_timesteps(num_steps, device)
    channels, height, width = latent_shape(pipe, resolution)
    sample = torch.randn((batch_size, channels, height, width), generator=generator, dtype=torch.float32)
    sample = (sample * getattr(pipe.scheduler, "init_noise_sigma", 1.0)).to(device, dtype)

    all_samples, all_log_probs, all_x0 = [sample], [], []
    negative_rows = None if negative is None else PromptEmbeds(
        negative.embeds.expand(batch_size, -1, -1), None if negative.pooled is None else negative.pooled.expand(batch_size, -1))
    # Checked once: the loop reads nothing back from the device (on a GPU each read would wait for it).
    policy.check_steps(stochastic)
    for k in tqdm(range(num_steps), desc="denoising", disable=not show_progress, leave=False):
        step_index = torch.full((batch_size,), k, dtype=torch.long, device=device)
        output = guided_model_output(model, sample, timesteps[k].expand(batch_size), embeds, negative_rows, guidance_scale)
        if k in stochastic:
            sample, log_prob, x0_pred = policy.step(output, step_index, sample, generator=generator, validate=False)
        else:
            sample, x0_pred = policy.ode_step(output, step_index, sample, validate=False)  # k < num_steps
            log_prob = torch.zeros(batch_size, device=device)
        all_samples.append(sample)
        all_log_probs.append(log_prob.float())
        all_x0.append(x0_pred)

    x0_preds = torch.stack(all_x0, dim=1)  # [B, T, ...]: reduced here to what credit reads
    boundary_images = None
    if decode_boundaries_every:
        steps = window_boundary_steps(num_steps, decode_boundaries_every)
        decoded = decode_to_images(pipe, x0_preds[:, steps].flatten(0, 1))
        boundary_images = decoded.unflatten(0, (batch_size, len(steps)))
    return Trajectories(
        prompts=list(prompts),
        prompt_embeds=embeds.embeds.cpu(),
        negative_prompt_embeds=None if negative is None else negative.embeds.cpu(),
        timesteps=timesteps.cpu(),
        latents=torch.stack(all_samples, dim=1).cpu(),
        log_probs=torch.stack(all_log_probs, dim=1).cpu(),
        cosines=cosine_to_final(x0_preds, sample).cpu(),
        images=decode_to_images(pipe, sample),
        policy_version=policy_version,
        pooled_prompt_embeds=None if embeds.pooled is None else embeds.pooled.cpu(),
        negative_pooled_prompt_embeds=None if negative is None or negative.pooled is None else negative.pooled.cpu(),
        sde_window=window,
        boundary_images=boundary_images,
    )
