"""The denoising step as a policy, for both sampler families, behind one small interface.

Everything above this module (the sampler, PPO's "score this action" call, the KL term, credit)
sees steps by their index k = 0..T-1 in sampling order and never asks which family it runs:

- DDIM(eta) on epsilon/v-prediction UNets (SD 1.x/2.x, the embedded tiny model): `dense_rl.diffusion.ddim`.
- The flow-matching SDE (Flow-GRPO) on rectified-flow transformers (SD3/3.5, the embedded
  tiny-flow model): `dense_rl.diffusion.flow`.

Both are a Gaussian per step with a known mean and std and a predicted clean sample x0. With no
noise (eta = 0, noise level 0) the mean is the deterministic (ODE) step, which is how steps outside
`sample.sde_window` are taken.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from dense_rl.diffusion.ddim import ddim_step_distribution, ddim_step_with_logprob
from dense_rl.diffusion.flow import flow_step_distribution, flow_step_with_logprob


@dataclass(frozen=True)
class StepPolicy:
    """A scheduler with its noise setting: `eta` for DDIM, `noise_level` for the flow SDE."""

    scheduler: object
    eta: float = 1.0
    noise_level: float = 0.7

    @property
    def is_flow(self) -> bool:
        return isinstance(self.scheduler, FlowMatchEulerDiscreteScheduler)

    def set_timesteps(self, num_steps: int, device) -> torch.Tensor:
        """Set the schedule for `num_steps` steps; returns the model timesteps [T]."""
        self.scheduler.set_timesteps(num_steps, device=device)
        if not self.is_flow:
            # DDIM's step reads these at every call: keep them where the samples are, so that no step
            # copies them from the host (a copy that waits for the device). The flow scheduler's
            # sigmas are already there.
            self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.to(device)
            self.scheduler.final_alpha_cumprod = torch.as_tensor(self.scheduler.final_alpha_cumprod, device=device)
        return self.scheduler.timesteps

    def check_steps(self, step_indices) -> None:
        """Raise what `step` would raise for any of these steps (a step without variance, an index
        out of range), reading the device once: a loop that calls `step(..., validate=False)` checks
        its steps here first."""
        device = self.scheduler.timesteps.device
        steps = torch.tensor(list(step_indices), dtype=torch.long, device=device)
        if len(steps) == 0:
            return
        zeros = torch.zeros(len(steps), 1, device=device)
        self.step(zeros, steps, zeros, prev_sample=zeros)

    def model_timesteps(self, step_index) -> torch.Tensor:
        """What the denoiser is conditioned on at steps `step_index` (an int or one per row): DDIM's
        t, or 1000 sigma for flow."""
        timesteps = self.scheduler.timesteps
        return timesteps[torch.as_tensor(step_index, device=timesteps.device)]

    def step_size(self, step_index) -> torch.Tensor:
        """|dt| = sigma_k - sigma_{k+1} of each flow step (one per row of `step_index`): the time the SDE
        integrates over, whose std is std_dev_t * sqrt(|dt|)."""
        if not self.is_flow:
            raise ValueError("the step size dt is the flow sampler's; DDIM steps have none")
        k = torch.as_tensor(step_index)
        sigmas = self.scheduler.sigmas.to(device=k.device, dtype=torch.float32)
        return sigmas[k] - sigmas[k + 1]

    def distribution(self, model_output, step_index, sample, *, stochastic: bool = True, validate: bool = True):
        """(mean, std, x0) of the step from `sample`; with stochastic=False the std is 0 and the
        mean is the ODE step."""
        if self.is_flow:
            noise_level = self.noise_level if stochastic else 0.0
            return flow_step_distribution(self.scheduler, model_output, step_index, sample, noise_level,
                                          validate=validate)
        eta = self.eta if stochastic else 0.0
        return ddim_step_distribution(self.scheduler, model_output, self.model_timesteps(step_index), sample, eta)

    def step(self, model_output, step_index, sample, prev_sample=None, generator=None, *, validate: bool = True):
        """Take (or, with `prev_sample`, score) a stochastic step: (prev_sample, log_prob [B], x0).
        `validate=False` skips the checks that read device values on the host (see check_steps)."""
        if self.is_flow:
            return flow_step_with_logprob(self.scheduler, model_output, step_index, sample, self.noise_level,
                                          prev_sample=prev_sample, generator=generator, validate=validate)
        return ddim_step_with_logprob(self.scheduler, model_output, self.model_timesteps(step_index), sample,
                                      self.eta, prev_sample=prev_sample, generator=generator, validate=validate)

    def ode_step(self, model_output, step_index, sample, *, validate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The deterministic step: (prev_sample in the sample's dtype, x0)."""
        mean, _, pred_x0 = self.distribution(model_output, step_index, sample, stochastic=False, validate=validate)
        return mean.to(sample.dtype), pred_x0


def guided_model_output(denoiser, sample, timesteps, embeds, negative, guidance_scale: float) -> torch.Tensor:
    """The denoiser's output (noise/v for a UNet, velocity for a flow transformer) with
    classifier-free guidance; `embeds`/`negative` are PromptEmbeds, `timesteps` one per row."""
    if negative is None or guidance_scale == 1.0:
        return _model_output(denoiser, sample, timesteps, embeds.embeds, embeds.pooled)
    pooled = None if embeds.pooled is None else torch.cat([negative.pooled, embeds.pooled])
    both = _model_output(denoiser, torch.cat([sample, sample]), torch.cat([timesteps, timesteps]),
                         torch.cat([negative.embeds, embeds.embeds]), pooled)
    unconditional, conditional = both.chunk(2)
    return unconditional + guidance_scale * (conditional - unconditional)


def _model_output(denoiser, sample, timesteps, embeds, pooled):
    if pooled is None:  # a UNet: SD 1.x/2.x and the tiny DDIM model
        return denoiser(sample, timesteps, encoder_hidden_states=embeds).sample
    return denoiser(hidden_states=sample, timestep=timesteps, encoder_hidden_states=embeds,
                    pooled_projections=pooled).sample
