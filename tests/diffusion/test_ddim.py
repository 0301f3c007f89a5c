"""DDIM step log-probs against diffusers' own DDIMScheduler.step and the Gaussian closed form."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler

from dense_rl.diffusion.ddim import ddim_step_distribution, ddim_step_with_logprob

NUM_STEPS = 20
SHAPE = (3, 4, 6, 6)


def make_scheduler(prediction_type="epsilon", clip_sample=False, thresholding=False, steps_offset=1):
    # Stable Diffusion's schedule; steps_offset=1 keeps the last step (t=1 -> final_alpha_cumprod) stochastic.
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        set_alpha_to_one=False,
        steps_offset=steps_offset,
        clip_sample=clip_sample,
        clip_sample_range=1.0,
        thresholding=thresholding,
        prediction_type=prediction_type,
    )
    scheduler.set_timesteps(NUM_STEPS)
    return scheduler


def closed_form(scheduler, model_output, t: int, sample, eta):
    """Mean and std of the DDIM(eta) reverse step in float64, written out from the DDIM paper."""
    config = scheduler.config
    alphas_cumprod = scheduler.alphas_cumprod.double()
    alpha_t = alphas_cumprod[t]
    prev_t = t - config.num_train_timesteps // NUM_STEPS
    alpha_prev = alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(float(scheduler.final_alpha_cumprod)).double()
    x, out = sample.double(), model_output.double()
    if config.prediction_type == "epsilon":
        x0, eps = (x - (1 - alpha_t).sqrt() * out) / alpha_t.sqrt(), out
    elif config.prediction_type == "sample":
        x0, eps = out, (x - alpha_t.sqrt() * out) / (1 - alpha_t).sqrt()
    else:  # v_prediction
        x0 = alpha_t.sqrt() * x - (1 - alpha_t).sqrt() * out
        eps = alpha_t.sqrt() * out + (1 - alpha_t).sqrt() * x
    if config.clip_sample:
        x0 = x0.clamp(-1, 1)
    std = eta * ((1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)).sqrt()
    mean = alpha_prev.sqrt() * x0 + (1 - alpha_prev - std**2).sqrt() * eps
    return mean, std


def batch_mean(values: torch.Tensor) -> torch.Tensor:
    return values.mean(dim=tuple(range(1, values.ndim)))


CONFIGS = [
    dict(prediction_type="epsilon", clip_sample=False),
    dict(prediction_type="epsilon", clip_sample=True),
    dict(prediction_type="v_prediction", clip_sample=False),
    dict(prediction_type="v_prediction", clip_sample=True),
    dict(prediction_type="sample", clip_sample=False),
    dict(prediction_type="sample", clip_sample=True),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c['prediction_type']}-clip{c['clip_sample']}")
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_sampling_matches_diffusers_and_closed_form(config, eta):
    scheduler = make_scheduler(**config)
    torch.manual_seed(0)
    # Scale 2 so clip_sample actually clips predicted x0 on some entries.
    sample, model_output = 2 * torch.randn(SHAPE), 2 * torch.randn(SHAPE)
    assert int(scheduler.timesteps[-1]) - 1000 // NUM_STEPS < 0  # the last step uses final_alpha_cumprod
    for index, t in enumerate(scheduler.timesteps.tolist()):
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(index))
        expected = scheduler.step(model_output, t, sample, eta=eta, variance_noise=noise)
        prev, log_prob, pred_x0 = ddim_step_with_logprob(
            scheduler, model_output, t, sample, eta, generator=torch.Generator().manual_seed(index)
        )
        torch.testing.assert_close(prev, expected.prev_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pred_x0, expected.pred_original_sample, rtol=1e-5, atol=1e-5)

        mean, std = closed_form(scheduler, model_output, t, sample, eta)
        reference = batch_mean(torch.distributions.Normal(mean, std).log_prob(prev.double()))
        torch.testing.assert_close(log_prob.double(), reference, rtol=1e-5, atol=1e-4)
    if config["clip_sample"]:
        assert pred_x0.abs().max() <= 1.0


def test_thresholding_matches_diffusers():
    scheduler = make_scheduler(thresholding=True)
    torch.manual_seed(1)
    sample, model_output = 3 * torch.randn(SHAPE), torch.randn(SHAPE)
    t = int(scheduler.timesteps[5])
    expected = scheduler.step(model_output, t, sample, eta=1.0, variance_noise=torch.zeros(SHAPE))
    prev, _, pred_x0 = ddim_step_with_logprob(scheduler, model_output, t, sample, 1.0, prev_sample=expected.prev_sample)
    mean, _, _ = ddim_step_distribution(scheduler, model_output, t, sample, 1.0)
    torch.testing.assert_close(mean, expected.prev_sample)  # zero noise: prev_sample is the mean
    torch.testing.assert_close(pred_x0, expected.pred_original_sample)


def test_given_prev_sample_reproduces_sampling_log_prob():
    scheduler = make_scheduler()
    torch.manual_seed(2)
    sample, model_output = torch.randn(SHAPE), torch.randn(SHAPE)
    for t in scheduler.timesteps[[0, 10, -1]].tolist():
        prev, log_prob, _ = ddim_step_with_logprob(
            scheduler, model_output, t, sample, 1.0, generator=torch.Generator().manual_seed(t)
        )
        rescored_prev, rescored, _ = ddim_step_with_logprob(scheduler, model_output, t, sample, 1.0, prev_sample=prev)
        assert torch.equal(rescored_prev, prev)
        torch.testing.assert_close(rescored, log_prob, rtol=0, atol=1e-6)


def test_per_row_timesteps_match_row_by_row_calls():
    scheduler = make_scheduler(prediction_type="v_prediction", clip_sample=True)
    torch.manual_seed(3)
    sample, model_output, prev = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    timesteps = scheduler.timesteps[[0, 7, -1]]  # includes the last (final_alpha_cumprod) step
    batched_prev, batched_log_prob, batched_x0 = ddim_step_with_logprob(
        scheduler, model_output, timesteps, sample, 1.0, prev_sample=prev
    )
    for row, t in enumerate(timesteps):
        rows = slice(row, row + 1)
        _, log_prob, pred_x0 = ddim_step_with_logprob(
            scheduler, model_output[rows], t, sample[rows], 1.0, prev_sample=prev[rows]
        )
        torch.testing.assert_close(batched_log_prob[rows], log_prob)
        torch.testing.assert_close(batched_x0[rows], pred_x0)
    # int, 0-d tensor and a constant per-row tensor are the same timestep.
    t = int(timesteps[1])
    results = [
        ddim_step_with_logprob(scheduler, model_output, step, sample, 1.0, prev_sample=prev)[1]
        for step in (t, torch.tensor(t), torch.full((SHAPE[0],), t))
    ]
    torch.testing.assert_close(results[0], results[1])
    torch.testing.assert_close(results[0], results[2])


def test_list_of_generators_draws_per_row_noise():
    scheduler = make_scheduler()
    sample, model_output = torch.randn(SHAPE), torch.randn(SHAPE)
    t = int(scheduler.timesteps[3])
    generators = [torch.Generator().manual_seed(seed) for seed in range(SHAPE[0])]
    prev, _, _ = ddim_step_with_logprob(scheduler, model_output, t, sample, 1.0, generator=generators)
    noise = torch.stack([torch.randn(SHAPE[1:], generator=torch.Generator().manual_seed(s)) for s in range(SHAPE[0])])
    expected = scheduler.step(model_output, t, sample, eta=1.0, variance_noise=noise).prev_sample
    torch.testing.assert_close(prev, expected, rtol=1e-5, atol=1e-5)


def test_invalid_arguments_raise():
    scheduler = make_scheduler()
    sample, model_output = torch.randn(SHAPE), torch.randn(SHAPE)
    t = int(scheduler.timesteps[0])
    with pytest.raises(ValueError, match="eta"):
        ddim_step_with_logprob(scheduler, model_output, t, sample, 0.0)
    with pytest.raises(ValueError, match="timestep"):
        ddim_step_with_logprob(scheduler, model_output, torch.full((SHAPE[0] + 1,), t), sample, 1.0)
    with pytest.raises(ValueError, match="timestep"):
        ddim_step_with_logprob(scheduler, model_output, torch.full((SHAPE[0], 1), t), sample, 1.0)
    with pytest.raises(ValueError, match="prev_sample"):
        ddim_step_with_logprob(scheduler, model_output, t, sample, 1.0, prev_sample=torch.randn(1, 4, 6, 6))


def test_zero_variance_last_step_raises():
    # steps_offset=0 puts t=0 last; alpha_prev = final_alpha_cumprod = alpha_0 makes it deterministic.
    scheduler = make_scheduler(steps_offset=0)
    assert int(scheduler.timesteps[-1]) == 0
    sample, model_output = torch.randn(SHAPE), torch.randn(SHAPE)
    with pytest.raises(ValueError, match="zero variance"):
        ddim_step_with_logprob(scheduler, model_output, 0, sample, 1.0)


def test_gradients_flow_to_model_output_through_log_prob():
    scheduler = make_scheduler()
    sample = torch.randn(SHAPE)
    model_output = torch.randn(SHAPE, requires_grad=True)
    prev = torch.randn(SHAPE)
    _, log_prob, _ = ddim_step_with_logprob(scheduler, model_output, int(scheduler.timesteps[4]), sample, 1.0, prev)
    log_prob.sum().backward()
    assert model_output.grad is not None
    assert torch.isfinite(model_output.grad).all()
    assert model_output.grad.abs().sum() > 0


def test_sampled_step_scores_higher_than_far_away_sample():
    scheduler = make_scheduler()
    torch.manual_seed(4)
    sample, model_output = torch.randn(SHAPE), torch.randn(SHAPE)
    t = int(scheduler.timesteps[10])
    prev, log_prob, _ = ddim_step_with_logprob(scheduler, model_output, t, sample, 1.0)
    _, std, _ = ddim_step_distribution(scheduler, model_output, t, sample, 1.0)
    _, far_log_prob, _ = ddim_step_with_logprob(scheduler, model_output, t, sample, 1.0, prev + 3 * std)
    assert (log_prob > far_log_prob).all()
    # A drawn step's mean log-density is close to the Gaussian's expected value -log(std) - 0.5*log(2 pi e).
    expected = -torch.log(std.flatten()) - 0.5 * math.log(2 * math.pi * math.e)
    torch.testing.assert_close(log_prob, expected, rtol=0, atol=0.25)


def test_fp16_keeps_schedule_terms_in_float32():
    # Near the end of sampling alpha_t / alpha_prev is ~0.9992; in fp16 that ratio (and the variance) is off by ~7%.
    scheduler = make_scheduler()
    sample, model_output = torch.randn(SHAPE), torch.randn(SHAPE)
    t = int(scheduler.timesteps[-2])
    _, std32, _ = ddim_step_distribution(scheduler, model_output, t, sample, 1.0)
    mean16, std16, x0_16 = ddim_step_distribution(scheduler, model_output.half(), t, sample.half(), 1.0)
    assert mean16.dtype == torch.float32 and x0_16.dtype == torch.float16
    torch.testing.assert_close(std16.float(), std32, rtol=1e-6, atol=0)
    prev, log_prob, _ = ddim_step_with_logprob(scheduler, model_output.half(), t, sample.half(), 1.0)
    assert prev.dtype == torch.float16 and log_prob.dtype == torch.float32
    assert torch.isfinite(log_prob).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_stores_the_action_it_scored(dtype):
    # The sampled action is rounded to the sample's dtype before it is scored, so rescoring the
    # stored action (PPO's path) gives exactly the stored log-prob; scoring the float32 point and
    # storing its rounding put them ~1e-3 apart at late steps, ten times SD's clip range.
    scheduler = make_scheduler()
    torch.manual_seed(5)
    sample, model_output = torch.randn(SHAPE).to(dtype), torch.randn(SHAPE).to(dtype)
    for t in (int(scheduler.timesteps[0]), int(scheduler.timesteps[-1])):
        prev, log_prob, _ = ddim_step_with_logprob(scheduler, model_output, t, sample, 1.0,
                                                   generator=torch.Generator().manual_seed(1))
        assert prev.dtype == dtype
        _, rescored, _ = ddim_step_with_logprob(scheduler, model_output, t, sample, 1.0, prev_sample=prev)
        assert torch.equal(rescored, log_prob)
