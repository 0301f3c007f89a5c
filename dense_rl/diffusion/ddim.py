"""One DDIM(eta) reverse step as a Gaussian policy: sample it, or score a given step.

This mirrors `diffusers.DDIMScheduler.step` (same prev-timestep rule, prediction types, clipping and
thresholding) but returns the log-density of the taken step, which the scheduler does not. Log-probs
are averaged over all non-batch dimensions (the DDPO convention that sets the scale of PPO's clip
range), and `timestep` may differ per batch row so that PPO can train on shuffled steps.
"""

from __future__ import annotations

import math

import torch
from diffusers import DDIMScheduler

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _per_row(values: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """Broadcast a [B] tensor against a [B, ...] sample."""
    return values.reshape(values.shape + (1,) * (sample.ndim - 1)).to(sample.dtype)


def _timesteps_per_row(timestep, sample: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(timestep, device=sample.device)
    if t.ndim == 0:
        t = t.expand(sample.shape[0])
    if t.shape != (sample.shape[0],):
        raise ValueError(
            f"timestep must be an int, a 0-d tensor or one per batch row ({sample.shape[0]}), "
            f"got shape {tuple(t.shape)}"
        )
    return t.long()


def ddim_step_distribution(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep,
    sample: torch.Tensor,
    eta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reverse step's Gaussian: returns (mean and std [B,1,..] in float32, predicted x0 in the sample's dtype).

    The arithmetic runs in float32 whatever the model's dtype, so sampling and PPO's rescoring of the
    same step compute the same mean, and the mean's gradient reaches the model output in float32.
    """
    if scheduler.num_inference_steps is None:
        raise ValueError("scheduler has no timesteps: call scheduler.set_timesteps(num_steps) first")
    if model_output.shape != sample.shape:
        raise ValueError(
            f"model_output shape {tuple(model_output.shape)} does not match sample shape {tuple(sample.shape)}"
        )
    config = scheduler.config
    t = _timesteps_per_row(timestep, sample)
    dtype = sample.dtype
    sample, model_output = sample.float(), model_output.float()
    prev_t = t - config.num_train_timesteps // scheduler.num_inference_steps

    # Schedule terms are float32 [B]: near the end of sampling alpha_t / alpha_prev is within 1e-3
    # of 1, and fp16 rounding of it would put the step's variance off by tens of percent.
    alphas_cumprod = scheduler.alphas_cumprod.to(device=sample.device, dtype=torch.float32)
    alpha_prod_t = alphas_cumprod[t.clamp(0, len(alphas_cumprod) - 1)]
    final_alpha = torch.as_tensor(scheduler.final_alpha_cumprod, device=sample.device, dtype=torch.float32)
    alpha_prod_prev = torch.where(prev_t >= 0, alphas_cumprod[prev_t.clamp(min=0)], final_alpha)
    beta_prod_t = 1 - alpha_prod_t
    sqrt_alpha_t = _per_row(alpha_prod_t.sqrt(), sample)
    sqrt_beta_t = _per_row(beta_prod_t.sqrt(), sample)

    if config.prediction_type == "epsilon":
        pred_x0 = (sample - sqrt_beta_t * model_output) / sqrt_alpha_t
        pred_eps = model_output
    elif config.prediction_type == "sample":
        pred_x0 = model_output
        pred_eps = (sample - sqrt_alpha_t * pred_x0) / sqrt_beta_t
    elif config.prediction_type == "v_prediction":
        pred_x0 = sqrt_alpha_t * sample - sqrt_beta_t * model_output
        pred_eps = sqrt_alpha_t * model_output + sqrt_beta_t * sample
    else:
        raise ValueError(f"unsupported prediction_type {config.prediction_type!r}")

    if config.thresholding:
        pred_x0 = scheduler._threshold_sample(pred_x0)  # computes in float32 itself
    elif config.clip_sample:
        pred_x0 = pred_x0.clamp(-config.clip_sample_range, config.clip_sample_range)

    variance = (1 - alpha_prod_prev) / beta_prod_t * (1 - alpha_prod_t / alpha_prod_prev)
    std = eta * variance.clamp(min=0).sqrt()
    direction_coef = (1 - alpha_prod_prev - std**2).clamp(min=0).sqrt()
    mean = _per_row(alpha_prod_prev.sqrt(), sample) * pred_x0 + _per_row(direction_coef, sample) * pred_eps
    std = std.reshape(std.shape + (1,) * (sample.ndim - 1))  # broadcastable against the sample
    return mean, std, pred_x0.to(dtype)


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep,
    sample: torch.Tensor,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    *,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Take (or score) one DDIM step; returns (prev_sample, log_prob [B], pred_original_sample).

    With `prev_sample` given no noise is drawn and the log-prob of that step is returned (the PPO
    path). `eta` must be > 0: with eta = 0 the step is deterministic and has no density.
    `validate=False` skips the check that every row's step has a variance, which reads a device
    value on the host: a loop over steps checks its schedule once instead (StepPolicy.check_steps).
    """
    if not eta > 0:
        raise ValueError(f"eta must be > 0 for a log-prob (got {eta}); eta = 0 is deterministic DDIM")
    mean, std, pred_x0 = ddim_step_distribution(scheduler, model_output, timestep, sample, eta)
    if validate and not bool((std > 0).all()):
        # alpha_prev == alpha_t: the step is deterministic, so its log-density is +-inf / NaN.
        raise ValueError(
            "this DDIM step has zero variance (its timestep is 0, or set_alpha_to_one=True makes the last "
            "step deterministic), so it has no log-prob; use set_alpha_to_one=False and steps_offset=1 "
            "(Stable Diffusion's scheduler config)"
        )

    prev_sample, log_prob = sample_and_score(mean, std, sample, prev_sample, generator)
    return prev_sample, log_prob, pred_x0


def sample_and_score(mean, std, sample, prev_sample=None, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw the action from N(mean, std^2) (or take the given `prev_sample`) and its log-prob [B]:
    the part every Gaussian step policy shares (DDIM here, the flow SDE in flow.py)."""
    if prev_sample is None:
        # The action is rounded to the sample's dtype *before* it is scored: that rounded value is what
        # is stored and what PPO rescores later, so its log-prob must be the stored one.
        noise = _randn_like(mean, generator)
        prev_sample = (mean + std * noise).to(sample.dtype)
    elif prev_sample.shape != sample.shape:
        raise ValueError(
            f"prev_sample shape {tuple(prev_sample.shape)} does not match sample shape {tuple(sample.shape)}"
        )

    # Gaussian log-density in float32 (fp16 squares overflow), averaged over non-batch dims.
    diff = prev_sample.detach().float() - mean
    log_prob = -(diff**2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    log_prob = log_prob.mean(dim=tuple(range(1, sample.ndim)))
    return prev_sample.to(sample.dtype), log_prob


def _randn_like(x: torch.Tensor, generator) -> torch.Tensor:
    if isinstance(generator, list):
        if len(generator) != x.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
        return torch.stack(
            [torch.randn(x.shape[1:], generator=g, device=g.device, dtype=x.dtype).to(x.device) for g in generator]
        )
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
