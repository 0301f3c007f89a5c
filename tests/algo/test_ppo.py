"""PPO-clip loss values, gradients and diagnostics; Gaussian KL closed form."""

from __future__ import annotations

import math

import pytest
import torch

from dense_rl.algo.ppo import gaussian_kl, ppo_clip_loss

CLIP = 0.2


def loss_and_grad(log_ratio, advantages, clip_range=CLIP, adv_clip_max=10.0):
    old_log_probs = torch.tensor([-1.0, -2.0, 0.5, 3.0])[: len(log_ratio)]
    log_probs = (old_log_probs + torch.tensor(log_ratio)).requires_grad_(True)
    loss, info = ppo_clip_loss(log_probs, old_log_probs, torch.tensor(advantages), clip_range, adv_clip_max)
    loss.backward()
    return loss, log_probs.grad, info


def test_loss_is_minus_mean_advantage_at_ratio_one():
    advantages = [1.5, -0.5, 2.0, 0.0]
    loss, grad, info = loss_and_grad([0.0] * 4, advantages)
    assert loss.item() == pytest.approx(-sum(advantages) / 4)
    torch.testing.assert_close(grad, -torch.tensor(advantages) / 4)
    assert info["approx_kl"].item() == 0.0 and info["clipfrac"].item() == 0.0
    assert info["ratio_mean"].item() == pytest.approx(1.0)


def test_positive_advantage_gradient_is_zero_above_the_clip_range():
    ratios = [1.5, 1.1, 0.5]  # above, inside, below the range
    loss, grad, _ = loss_and_grad([math.log(r) for r in ratios], [2.0, 2.0, 2.0])
    n = len(ratios)
    assert grad[0].item() == 0.0  # ratio > 1 + eps: clipped, no gradient
    assert grad[1].item() == pytest.approx(-2.0 * 1.1 / n)  # d(-A r)/d log_prob = -A r, averaged
    assert grad[2].item() == pytest.approx(-2.0 * 0.5 / n)  # below the range the pessimistic term is unclipped
    expected = (-2.0 * (1 + CLIP) - 2.0 * 1.1 - 2.0 * 0.5) / n
    assert loss.item() == pytest.approx(expected)


def test_negative_advantage_gradient_is_zero_below_the_clip_range():
    ratios = [0.5, 0.9, 1.5]  # below, inside, above the range
    loss, grad, _ = loss_and_grad([math.log(r) for r in ratios], [-1.0, -1.0, -1.0])
    n = len(ratios)
    assert grad[0].item() == 0.0  # ratio < 1 - eps with A < 0: clipped
    assert grad[1].item() == pytest.approx(1.0 * 0.9 / n)
    assert grad[2].item() == pytest.approx(1.0 * 1.5 / n)
    expected = ((1 - CLIP) + 0.9 + 1.5) / n
    assert loss.item() == pytest.approx(expected)


def test_advantages_are_clipped_before_the_loss():
    loss, _, _ = loss_and_grad([0.0, 0.0], [100.0, -3.0], adv_clip_max=5.0)
    assert loss.item() == pytest.approx(-(5.0 - 3.0) / 2)


def test_clipfrac_and_approx_kl_on_a_hand_example():
    log_ratio = [0.1, -0.3, 0.25, 0.0]
    _, _, info = loss_and_grad(log_ratio, [1.0, 1.0, -1.0, 1.0])
    # |exp(0.1) - 1| = 0.105, |exp(-0.3) - 1| = 0.259, |exp(0.25) - 1| = 0.284, 0: two of four exceed 0.2.
    assert info["clipfrac"].item() == pytest.approx(0.5)
    assert info["approx_kl"].item() == pytest.approx(0.5 * (0.01 + 0.09 + 0.0625 + 0.0) / 4)
    assert info["ratio_mean"].item() == pytest.approx(sum(math.exp(x) for x in log_ratio) / 4, rel=1e-6)
    assert not any(value.requires_grad for value in info.values())


def test_invalid_arguments_raise():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="same shape"):
        ppo_clip_loss(x, torch.zeros(4), x, CLIP, 5.0)
    with pytest.raises(ValueError, match="same shape"):
        ppo_clip_loss(x, x, torch.zeros(3, 1), CLIP, 5.0)
    for bad in (0.0, -0.1):
        with pytest.raises(ValueError, match="clip_range"):
            ppo_clip_loss(x, x, x, bad, 5.0)


def test_gaussian_kl_closed_form():
    torch.manual_seed(0)
    mean_p = torch.randn(3, 2, 4, 4)
    assert torch.equal(gaussian_kl(mean_p, mean_p.clone(), 0.7), torch.zeros(3))
    mean_q = mean_p + 0.5
    std = torch.tensor([0.5, 1.0, 2.0]).view(3, 1, 1, 1)
    # (0.5)^2 / (2 std^2) on every element, so also its mean.
    torch.testing.assert_close(gaussian_kl(mean_p, mean_q, std), torch.tensor([0.5, 0.125, 0.03125]))
    # Against torch.distributions with a general difference.
    mean_q = torch.randn(3, 2, 4, 4)
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean_p, std.expand_as(mean_p)), torch.distributions.Normal(mean_q, std.expand_as(mean_q))
    ).mean(dim=(1, 2, 3))
    torch.testing.assert_close(gaussian_kl(mean_p, mean_q, std), reference)
    with pytest.raises(ValueError, match="same shape"):
        gaussian_kl(mean_p, mean_q[:2], std)


def test_decoupled_loss_clips_around_the_proximal_policy_and_weights_by_the_behaviour_ratio():
    proximal = torch.tensor([-1.0, -2.0, 0.5])
    behaviour = proximal - torch.tensor([0.1, -0.2, 0.0])  # the sampler's policy, one version older
    log_probs = (proximal + torch.tensor([0.0, math.log(1.5), 0.0])).requires_grad_(True)
    advantages = torch.tensor([1.0, 2.0, -1.0])
    loss, info = ppo_clip_loss(log_probs, proximal, advantages, CLIP, 10.0, behaviour_log_probs=behaviour)
    loss.backward()
    weights = torch.exp(proximal - behaviour)
    ratios = torch.tensor([1.0, 1.5, 1.0])
    surrogate = torch.maximum(-advantages * ratios, -advantages * ratios.clamp(1 - CLIP, 1 + CLIP))
    assert loss.item() == pytest.approx(float((weights * surrogate).mean()))
    # Row 1 is clipped around the proximal policy (1.5 > 1 + eps, A > 0): no gradient; the others get -w A r / n.
    torch.testing.assert_close(log_probs.grad, torch.stack([-weights[0] * 1.0, torch.tensor(0.0), weights[2] * 1.0]) / 3)
    assert info["importance_weight"].item() == pytest.approx(float(weights.mean()))
    assert info["clipfrac"].item() == pytest.approx(1 / 3)
    # Without a behaviour policy it is DDPO's loss, weight 1.
    plain, plain_info = ppo_clip_loss(log_probs.detach(), proximal, advantages, CLIP, 10.0)
    assert plain.item() == pytest.approx(float(surrogate.mean())) and plain_info["importance_weight"].item() == 1.0
