"""Prompts -> trajectories: stochastic sampling (DDIM(eta), or the flow SDE) that records everything
PPO and CoCA need. The family comes with the pipeline (dense_rl.diffusion.policy)."""

from __future__ import annotations

import time

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
    boundaries: str | None = None,
    window_size: int = 1,
    deterministic: bool = False,
    generator: torch.Generator | None = None,
    policy_version: int = 0,
    show_progress: bool = False,
) -> Trajectories:
    """Sample one trajectory per prompt with `pipe` (SD 1.x/2.x: DDIM(eta); SD3: the flow SDE at
    `noise_level`), stochastic on the steps in `sde_window` and ODE elsewhere, at `resolution` pixels
    (None: the model's own size). Seeded by
    `generator` (a CPU generator keeps runs reproducible across devices: noise is drawn on the CPU).
    `boundaries` hands over an image at each window boundary k = 0, w, 2w, ... (w = `window_size`), for
    the credit modes that score them: "x0", the predicted clean sample at step k, decoded; "ode", the
    state before step k completed to a clean image by deterministic steps k..T-1 (T - k denoiser calls;
    their count and time are recorded). `deterministic=True` takes every step by the ODE (no log-probs):
    how flow models are evaluated."""
    if len(prompts) == 0:
        raise ValueError("prompts is empty: pass at least one prompt")
    model = denoiser(pipe)
    device, dtype = model.device, model.dtype
    batch_size = len(prompts)
    window = tuple(sde_window) if sde_window else None
    stochastic = range(0) if deterministic else range(*window) if window else range(num_steps)
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
    boundary_images, boundary_calls, boundary_seconds = None, 0, 0.0
    if boundaries is not None:
        started = time.perf_counter()
        steps = window_boundary_steps(num_steps, window_size)
        if boundaries == "x0":
            clean = x0_preds[:, steps].flatten(0, 1)
        elif boundaries == "ode":
            clean, boundary_calls = complete_by_ode(model, policy, all_samples, steps, timesteps, embeds, negative_rows,
                                                    guidance_scale)
        else:
            raise ValueError(f"boundaries must be None, 'x0' or 'ode', got {boundaries!r}")
        boundary_images = decode_to_images(pipe, clean).unflatten(0, (batch_size, len(steps)))
        boundary_seconds = time.perf_counter() - started
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
        boundary_model_calls=boundary_calls,
        boundary_seconds=boundary_seconds,
    )


def complete_by_ode(model, policy: StepPolicy, states: list[torch.Tensor], starts: list[int], timesteps, embeds,
                    negative_rows, guidance_scale: float) -> tuple[torch.Tensor, int]:
    """The states before steps `starts` ([B, ...] each, states[k]), each taken to a clean sample by the
    deterministic steps k..T-1: [B * len(starts), ...] in (row, start) order, and the denoiser calls per
    trajectory. At each step every completion that has started runs in one batch."""
    batch_size, num_steps = states[0].shape[0], len(timesteps)
    current: dict[int, torch.Tensor] = {}
    calls = 0
    for j in range(num_steps):
        for k in starts:
            if k == j:
                current[k] = states[k]
        active = sorted(current)
        sample = torch.cat([current[k] for k in active])
        rows = len(active) * batch_size
        positive = PromptEmbeds.cat([embeds] * len(active))
        negative = None if negative_rows is None else PromptEmbeds.cat([negative_rows] * len(active))
        output = guided_model_output(model, sample, timesteps[j].expand(rows), positive, negative, guidance_scale)
        stepped, _ = policy.ode_step(output, torch.full((rows,), j, dtype=torch.long, device=sample.device), sample,
                                     validate=False)
        for index, k in enumerate(active):
            current[k] = stepped[index * batch_size:(index + 1) * batch_size]
        calls += len(active)
    # (row, start) order, as boundary_images is laid out: [B, J, ...].
    return torch.stack([current[k] for k in starts], dim=1).flatten(0, 1), calls
