"""One flow-matching SDE step as a Gaussian policy (Flow-GRPO's sampler): sample it, or score a given step.

Rectified-flow models (SD3/3.5, FLUX) predict the velocity v of x_t = (1 - sigma) x0 + sigma * noise,
v = noise - x0, and diffusers' `FlowMatchEulerDiscreteScheduler.step` takes the Euler step of the
probability-flow ODE, x' = x + v * dt with dt = sigma_next - sigma < 0. Flow-GRPO (Liu et al., 2025,
"Flow-GRPO: Training Flow Matching Models via Online RL") makes that step stochastic with the same
marginals by adding the score term of the reverse SDE; for this marginal path the score is
-(x + (1 - sigma) v) / sigma. With g = noise_level * sqrt(sigma / (1 - sigma)) the step is Gaussian:

    mean = x * (1 + g^2 / (2 sigma) * dt) + v * (1 + g^2 (1 - sigma) / (2 sigma)) * dt
    std  = g * sqrt(-dt)

We checked this against `sde_step_with_logprob` in the public flow_grpo repository
(flow_grpo/diffusers_patch/sd3_sde_with_logprob.py, sde_type "sde"), including its trick for sigma = 1
(the first step with an unshifted schedule): there 1 - sigma is 0, so g uses 1 - sigmas[1] in the
denominator and stays finite. noise_level = 0 gives std 0 and mean = diffusers' Euler step.

Steps are addressed by index k (sigma_k -> sigma_{k+1} in `scheduler.sigmas`), not by timestep, and may
differ per batch row so that PPO can train on shuffled steps. Log-probs are averaged over all non-batch
dimensions (the DDPO convention, as in ddim.py).
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from dense_rl.diffusion.ddim import _per_row, sample_and_score


def _step_indices_per_row(step_index, sample: torch.Tensor, num_steps: int, validate: bool) -> torch.Tensor:
    k = torch.as_tensor(step_index, device=sample.device)
    if k.is_floating_point() or k.is_complex() or k.dtype == torch.bool:
        # A float is most likely a timestep (Flow-GRPO's API), which would silently index the wrong sigma.
        raise ValueError(f"step_index must be an integer step index, got dtype {k.dtype}")
    if k.ndim == 0:
        k = k.expand(sample.shape[0])
    if k.shape != (sample.shape[0],):
        raise ValueError(
            f"step_index must be an int, a 0-d tensor or one per batch row ({sample.shape[0]}), "
            f"got shape {tuple(k.shape)}"
        )
    if validate and bool(((k < 0) | (k >= num_steps)).any()):
        raise ValueError(f"step_index must be in [0, {num_steps}), got {k.tolist()}")
    return k.long()


def flow_step_distribution(
    scheduler: FlowMatchEulerDiscreteScheduler,
    model_output: torch.Tensor,
    step_index,
    sample: torch.Tensor,
    noise_level: float,
    *,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SDE step's Gaussian: returns (mean float32, std [B,1,..] float32, predicted x0 in the sample's dtype).

    As in ddim.py the arithmetic runs in float32 whatever the model's dtype, so sampling and PPO's
    rescoring compute the same mean, and bf16/fp16 rounding does not move the late, tiny-dt steps.
    `validate=False` skips the checks of the step indices and the schedule, which read device values
    on the host (a loop over steps checks them once: StepPolicy.check_steps).
    """
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("scheduler has no timesteps: call scheduler.set_timesteps(num_steps) first")
    if model_output.shape != sample.shape:
        raise ValueError(
            f"model_output shape {tuple(model_output.shape)} does not match sample shape {tuple(sample.shape)}"
        )
    if not noise_level >= 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    sigmas = scheduler.sigmas.to(device=sample.device, dtype=torch.float32)
    k = _step_indices_per_row(step_index, sample, len(sigmas) - 1, validate)
    dtype = sample.dtype
    x, v = sample.float(), model_output.float()

    sigma, sigma_next = sigmas[k], sigmas[k + 1]
    dt = sigma_next - sigma
    if validate and bool((dt >= 0).any()):
        raise ValueError("sigmas must decrease along sampling (invert_sigmas is not supported)")
    # sigma == 1: 1 - sigma is 0, so Flow-GRPO divides by 1 - sigmas[1] instead (finite noise on step 0).
    denom = 1 - torch.where(sigma == 1, sigmas[1], sigma)
    std_dev_t = noise_level * (sigma / denom).sqrt()
    x_coef = 1 + std_dev_t**2 / (2 * sigma) * dt
    v_coef = (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    mean = _per_row(x_coef, x) * x + _per_row(v_coef, x) * v
    std = _per_row(std_dev_t * (-dt).sqrt(), x)
    pred_x0 = x - _per_row(sigma, x) * v
    return mean, std, pred_x0.to(dtype)


def flow_step_with_logprob(
    scheduler: FlowMatchEulerDiscreteScheduler,
    model_output: torch.Tensor,
    step_index,
    sample: torch.Tensor,
    noise_level: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    *,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Take (or score) one SDE step; returns (prev_sample in the sample's dtype, log_prob [B] float32, pred_x0).

    With `prev_sample` given no noise is drawn and the log-prob of that step is returned (the PPO
    path). `noise_level` must be > 0 (Flow-GRPO uses 0.7): at 0 the step is the deterministic Euler
    step and has no density. `validate=False` skips the checks that read device values on the host.
    """
    if not noise_level > 0:
        raise ValueError(
            f"noise_level must be > 0 for a log-prob (got {noise_level}); 0 is the deterministic Euler step"
        )
    mean, std, pred_x0 = flow_step_distribution(scheduler, model_output, step_index, sample, noise_level,
                                                validate=validate)
    if validate and not bool((std > 0).all()):
        raise ValueError("this flow step has zero std (sigma is 0 before the last step), so it has no log-prob")

    prev_sample, log_prob = sample_and_score(mean, std, sample, prev_sample, generator)
    return prev_sample, log_prob, pred_x0
