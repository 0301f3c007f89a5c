"""Flow-matching SDE step log-probs against diffusers' FlowMatchEulerDiscreteScheduler and the Gaussian closed form."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from dense_rl.diffusion.flow import flow_step_distribution, flow_step_with_logprob

NUM_STEPS = 10
SHAPE = (3, 4, 6, 6)
SHIFTS = [1.0, 3.0]  # the default config, and SD3's shift


def make_scheduler(shift=1.0, num_steps=NUM_STEPS):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(num_steps)
    return scheduler


def batch_mean(values: torch.Tensor) -> torch.Tensor:
    return values.mean(dim=tuple(range(1, values.ndim)))


@pytest.mark.parametrize("shift", SHIFTS)
def test_zero_noise_mean_is_diffusers_euler_step(shift):
    scheduler = make_scheduler(shift)
    assert float(scheduler.sigmas[0]) == 1.0  # step 0 exercises the sigma == 1 branch
    torch.manual_seed(0)
    sample = torch.randn(SHAPE)
    for k, t in enumerate(scheduler.timesteps):
        model_output = torch.randn(SHAPE)
        mean, std, _ = flow_step_distribution(scheduler, model_output, k, sample, 0.0)
        expected = scheduler.step(model_output, t, sample).prev_sample  # keeps its own step index
        torch.testing.assert_close(mean, expected, rtol=0, atol=1e-6)
        assert torch.equal(std, torch.zeros(SHAPE[0], 1, 1, 1))
        sample = expected


@pytest.mark.parametrize("shift", SHIFTS)
def test_log_prob_matches_normal_with_per_row_steps(shift):
    scheduler = make_scheduler(shift)
    torch.manual_seed(1)
    sample, model_output, prev = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    steps = torch.tensor([0, 4, NUM_STEPS - 1])  # first (sigma == 1), middle and last (sigma_next == 0)
    _, log_prob, pred_x0 = flow_step_with_logprob(scheduler, model_output, steps, sample, 0.7, prev_sample=prev)
    mean, std, _ = flow_step_distribution(scheduler, model_output, steps, sample, 0.7)
    torch.testing.assert_close(log_prob, batch_mean(torch.distributions.Normal(mean, std).log_prob(prev)))
    for row, k in enumerate(steps.tolist()):
        rows = slice(row, row + 1)
        row_mean, row_std, _ = flow_step_distribution(scheduler, model_output[rows], k, sample[rows], 0.7)
        torch.testing.assert_close(mean[rows], row_mean)
        torch.testing.assert_close(std[rows], row_std)
        _, row_log_prob, row_x0 = flow_step_with_logprob(
            scheduler, model_output[rows], torch.tensor(k), sample[rows], 0.7, prev_sample=prev[rows]
        )
        torch.testing.assert_close(log_prob[rows], row_log_prob)
        torch.testing.assert_close(pred_x0[rows], row_x0)
    # Closed form of the std for one row, written out (sigma_max trick on step 0).
    sigmas = scheduler.sigmas.double()
    s, s_next = sigmas[4], sigmas[5]
    expected_std = 0.7 * (s / (1 - s)).sqrt() * (s - s_next).sqrt()
    torch.testing.assert_close(std[1].flatten().double(), expected_std.reshape(1), rtol=1e-6, atol=0)
    s0 = 0.7 * (1 / (1 - sigmas[1])).sqrt() * (1 - sigmas[1]).sqrt()
    torch.testing.assert_close(std[0].flatten().double(), s0.reshape(1), rtol=1e-6, atol=0)


def test_sampling_is_reproducible_and_has_the_stated_moments():
    scheduler = make_scheduler(3.0)
    torch.manual_seed(2)
    sample, model_output = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    a, log_a, _ = flow_step_with_logprob(scheduler, model_output, 3, sample, 0.7,
                                         generator=torch.Generator().manual_seed(7))
    b, log_b, _ = flow_step_with_logprob(scheduler, model_output, 3, sample, 0.7,
                                         generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and torch.equal(log_a, log_b)
    # A list of per-row generators draws per-row noise.
    gens = [torch.Generator().manual_seed(s) for s in (7, 7)]
    pair, _, _ = flow_step_with_logprob(scheduler, model_output.expand(2, -1, -1, -1), 3,
                                        sample.expand(2, -1, -1, -1), 0.7, generator=gens)
    assert torch.equal(pair[0], a[0]) and torch.equal(pair[1], a[0])

    n = 20000
    many = (n,) + sample.shape[1:]
    draws, _, _ = flow_step_with_logprob(scheduler, model_output.expand(many), 3, sample.expand(many), 0.7,
                                         generator=torch.Generator().manual_seed(8))
    mean, std, _ = flow_step_distribution(scheduler, model_output, 3, sample, 0.7)
    s = float(std)
    torch.testing.assert_close(draws.mean(0), mean[0], rtol=0, atol=5 * s / n**0.5)
    torch.testing.assert_close(draws.std(0), torch.full_like(mean[0], s), rtol=0.05, atol=0)


@pytest.mark.parametrize("shift", SHIFTS)
def test_pred_x0_recovers_the_clean_sample(shift):
    scheduler = make_scheduler(shift)
    torch.manual_seed(3)
    x0, eps = torch.randn(SHAPE), torch.randn(SHAPE)
    steps = torch.tensor([0, 5, NUM_STEPS - 1])
    sigma = scheduler.sigmas[steps].reshape(-1, 1, 1, 1)
    x_t = (1 - sigma) * x0 + sigma * eps
    _, _, pred_x0 = flow_step_distribution(scheduler, eps - x0, steps, x_t, 0.7)
    torch.testing.assert_close(pred_x0, x0, rtol=0, atol=1e-5)
    v = torch.randn(SHAPE)
    _, _, pred_x0 = flow_step_distribution(scheduler, v, steps, x_t, 0.7)
    torch.testing.assert_close(pred_x0, x_t - sigma * v)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_stores_the_action_it_scored(dtype):
    scheduler = make_scheduler(3.0)
    torch.manual_seed(4)
    sample, model_output = torch.randn(SHAPE).to(dtype), torch.randn(SHAPE).to(dtype)
    for steps in (0, NUM_STEPS - 1, torch.tensor([0, 5, NUM_STEPS - 1])):
        prev, log_prob, pred_x0 = flow_step_with_logprob(scheduler, model_output, steps, sample, 0.7,
                                                         generator=torch.Generator().manual_seed(1))
        assert prev.dtype == dtype and pred_x0.dtype == dtype and log_prob.dtype == torch.float32
        assert torch.isfinite(prev.float()).all() and torch.isfinite(log_prob).all()
        rescored_prev, rescored, _ = flow_step_with_logprob(scheduler, model_output, steps, sample, 0.7,
                                                            prev_sample=prev)
        assert torch.equal(rescored_prev, prev)
        assert torch.equal(rescored, log_prob)
    mean16, std16, _ = flow_step_distribution(scheduler, model_output, NUM_STEPS - 1, sample, 0.7)
    _, std32, _ = flow_step_distribution(scheduler, model_output.float(), NUM_STEPS - 1, sample.float(), 0.7)
    assert mean16.dtype == torch.float32 and torch.equal(std16, std32)


def test_gradients_flow_to_model_output():
    scheduler = make_scheduler()
    model_output = torch.randn(SHAPE, requires_grad=True)
    _, log_prob, _ = flow_step_with_logprob(scheduler, model_output, 2, torch.randn(SHAPE), 0.7, torch.randn(SHAPE))
    log_prob.sum().backward()
    assert torch.isfinite(model_output.grad).all() and model_output.grad.abs().sum() > 0


def test_invalid_arguments_raise():
    scheduler = make_scheduler()
    sample, model_output = torch.randn(SHAPE), torch.randn(SHAPE)
    with pytest.raises(ValueError, match="noise_level"):
        flow_step_with_logprob(scheduler, model_output, 0, sample, 0.0)
    with pytest.raises(ValueError, match="noise_level"):
        flow_step_distribution(scheduler, model_output, 0, sample, -0.1)
    with pytest.raises(ValueError, match="step_index"):
        flow_step_with_logprob(scheduler, model_output, torch.zeros(SHAPE[0] + 1, dtype=torch.long), sample, 0.7)
    with pytest.raises(ValueError, match="step_index"):
        flow_step_with_logprob(scheduler, model_output, torch.zeros(SHAPE[0], 1, dtype=torch.long), sample, 0.7)
    with pytest.raises(ValueError, match="step_index"):
        flow_step_with_logprob(scheduler, model_output, NUM_STEPS, sample, 0.7)
    with pytest.raises(ValueError, match="step_index"):  # a timestep, not a step index
        flow_step_with_logprob(scheduler, model_output, scheduler.timesteps[0], sample, 0.7)
    with pytest.raises(ValueError, match="prev_sample"):
        flow_step_with_logprob(scheduler, model_output, 0, sample, 0.7, prev_sample=torch.randn(1, 4, 6, 6))
    with pytest.raises(ValueError, match="model_output"):
        flow_step_with_logprob(scheduler, model_output[:1], 0, sample, 0.7)
    with pytest.raises(ValueError, match="set_timesteps"):
        flow_step_with_logprob(FlowMatchEulerDiscreteScheduler(), model_output, 0, sample, 0.7)


def _one_step_from_the_marginal(scheduler, k, n=20000, dim=16):
    # Data is a single point x0, so v = eps - x0 is the exact velocity field at every x_t.
    gen = torch.Generator().manual_seed(10 + k)
    s = float(scheduler.sigmas[k])
    x0 = torch.linspace(-1, 1, dim).reshape(1, dim)
    eps = torch.randn(n, dim, generator=gen)
    x_t = (1 - s) * x0 + s * eps
    prev, _, _ = flow_step_with_logprob(scheduler, eps - x0, k, x_t, 0.7, generator=gen)
    return x0[0], x_t, eps - x0, prev, gen


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("k", [0, 1, 4])
def test_one_step_keeps_the_flow_marginal(shift, k):
    # One SDE step from x_t = (1 - s) x0 + s eps lands on (1 - s') x0 + s' eps': the mean (1 - s') x0
    # exactly, the variance s'^2 up to the Euler-Maruyama error, O(dt^2): up to 19% at these 10-step
    # steps (25% allowed for sampling noise). It is relatively large only in the last steps, where
    # s' -> 0, and there the last step (to sigma 0) maps back onto x0.
    scheduler = make_scheduler(shift)
    s, s_next = float(scheduler.sigmas[k]), float(scheduler.sigmas[k + 1])
    x0, x_t, v, prev, gen = _one_step_from_the_marginal(scheduler, k)
    n = prev.shape[0]
    torch.testing.assert_close(prev.mean(0), (1 - s_next) * x0, rtol=0, atol=5 * s / n**0.5)
    torch.testing.assert_close(prev.var(0), torch.full_like(x0, s_next**2), rtol=0.25, atol=0)
    # Without the score correction the same noise inflates the variance much more.
    _, std, _ = flow_step_distribution(scheduler, v, k, x_t, 0.7)
    naive = x_t + (s_next - s) * v + std * torch.randn(x_t.shape, generator=gen)
    assert float(naive.var(0).mean()) > 1.2 * float(prev.var(0).mean())


def test_marginal_error_shrinks_with_the_step():
    # At 50 steps a middle step keeps the variance within ~0.2% (the O(dt^2) error); check to 2%.
    scheduler = make_scheduler(3.0, num_steps=50)
    s_next = float(scheduler.sigmas[26])
    _, _, _, prev, _ = _one_step_from_the_marginal(scheduler, 25)
    torch.testing.assert_close(prev.var(0).mean(), torch.tensor(s_next**2), rtol=0.02, atol=0)
