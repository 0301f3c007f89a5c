"""The in-process trainer leaves samples with a NaN/inf reward out of the update, as the Ray
system does: training with bad rows equals, bit for bit, training on a batch that never had them."""

import pytest
import torch

from dense_rl.config import load_config
from dense_rl.diffusion.lora import lora_state_dict
from dense_rl.rewards import WeightedRewards
from dense_rl.training import trainer as loop

# JPEG size scores each image on its own, so removing rows changes no other row's reward in the last
# bit (a batched network's rounding depends on the batch size).
TINY_RUN = ["run.num_epochs=2", "sample.num_steps=5", "sample.guidance_scale=1.0", "sample.batch_size=8",
            "sample.num_batches_per_epoch=1", "sample.samples_per_prompt=4", "train.batch_size=4",
            "rewards=[{name: jpeg_compressibility}]"]
BAD, KEPT = [1, 6], [0, 2, 3, 4, 5, 7]  # rows of every epoch's batch of 8


class BadRowsRewards(WeightedRewards):
    """The configured rewards, with NaN and +inf in the rows BAD (a reward model gone bad on them)."""

    def __call__(self, images, prompts):
        total, components = super().__call__(images, prompts)
        total = total.clone()
        total[BAD] = torch.tensor([float("nan"), float("inf")])
        return total, components


def test_the_loop_trains_only_on_samples_with_a_finite_reward(monkeypatch):
    config = load_config("configs/tiny.yaml", TINY_RUN)

    with monkeypatch.context() as patch:
        patch.setattr(loop, "WeightedRewards", BadRowsRewards)
        with_bad_rows = loop.train(config, show_progress=False, keep_policy=(bad := {}))

    sample_epoch = loop.sample_epoch
    with monkeypatch.context() as patch:  # the same epochs, with those rows never sampled
        patch.setattr(loop, "sample_epoch", lambda *args, **kwargs: sample_epoch(*args, **kwargs).select(KEPT))
        without_them = loop.train(config, show_progress=False, keep_policy=(clean := {}))

    assert [m["bad_rewards"] for m in with_bad_rows] == [2, 2] and [m["bad_rewards"] for m in without_them] == [0, 0]
    for a, b in zip(with_bad_rows, without_them):
        assert a["learner_optimizer_steps"] == b["learner_optimizer_steps"] == 2  # 6 rows in minibatches of 4: 4 + 2
        for key in ("reward_mean", "reward_std", "learner_policy_loss", "learner_clipfrac", "learner_approx_kl",
                    "learner_grad_norm"):
            assert a[key] == b[key], key
    trained, reference = lora_state_dict(bad["pipe"].unet), lora_state_dict(clean["pipe"].unet)
    assert any(v.abs().max() > 0 for k, v in trained.items() if "lora_B" in k)  # it did train
    for key in reference:
        assert torch.equal(trained[key], reference[key]), key


def test_reward_gain_credit_in_the_loop():
    """The in-process loop trains with reward_gain credit and reports the credit profile per step:
    one weight per window of 5 steps, a mean that sums to 1 over the steps, and the cosine curve. Both
    hold for any normalised window weights, uniform fallback included, so the profile must also differ
    from uniform 1/T with rows that did not fall back (boundary rewards scored and used)."""
    config = load_config("configs/tiny.yaml", ["run.num_epochs=1", "sample.num_steps=10", "sample.batch_size=8",
                                               "sample.num_batches_per_epoch=1", "train.batch_size=8",
                                               "credit.mode=reward_gain"])
    (metrics,) = loop.train(config, show_progress=False)
    mean = torch.tensor(metrics["step_weight_mean_per_step"])
    assert mean.shape == (10,) and abs(float(mean.sum()) - 1) < 1e-5
    assert torch.equal(mean[:5], mean[:1].expand(5)) and torch.equal(mean[5:], mean[5:6].expand(5))
    assert not torch.allclose(mean, torch.full((10,), 0.1)) and metrics["credit_fallbacks"] < 8  # of 8 rows
    assert len(metrics["cosine_mean_per_step"]) == 10 and metrics["learner_optimizer_steps"] == 1


@pytest.mark.parametrize("preset", ["configs/tiny.yaml", "configs/tiny-flow.yaml"])
def test_ode_gain_credit_in_the_trainer(preset):
    """ode_gain in the in-process trainer, for both sampler families: the boundaries are completed by the
    ODE (10 + 5 extra denoiser calls per sample at 10 steps, windows of 5), the credit is one weight per
    window and not uniform, and the update trains."""
    config = load_config(preset, ["run.num_epochs=1", "sample.num_steps=10", "sample.batch_size=8",
                                  "sample.num_batches_per_epoch=1", "train.batch_size=8", "credit.mode=ode_gain",
                                  "credit.window_size=5"])
    (metrics,) = loop.train(config, show_progress=False)
    assert metrics["credit_model_calls_per_sample"] == 15.0 and metrics["credit_seconds_per_sample"] > 0
    mean = torch.tensor(metrics["step_weight_mean_per_step"])
    assert torch.equal(mean[:5], mean[:1].expand(5)) and not torch.allclose(mean, torch.full((10,), 0.1))
    assert metrics["credit_fallbacks"] < 8 and metrics["learner_optimizer_steps"] == 1
