"""The flow-matching family through the code every family shares: sampling trajectories from an
SD3-shaped pipeline, PPO's rescoring of the stored actions, the update, and `sample.sde_window`."""

from __future__ import annotations

import pytest
import torch

from dense_rl.config import TrainConfig
from dense_rl.diffusion.lora import add_lora
from dense_rl.diffusion.pipeline import denoiser, load_pipeline
from dense_rl.diffusion.policy import StepPolicy
from dense_rl.diffusion.sampler import sample_trajectories
from dense_rl.diffusion.trajectories import Trajectories
from dense_rl.training.update import ppo_update, score_actions
from support.training import GradientRecorder

PROMPTS = ["a red cat", "a blue dog", "a cat", "a dog"]
STEPS = 6
TRAIN = TrainConfig(batch_size=4, clip_range=10.0, adv_clip_max=10.0, max_grad_norm=1e9)


@pytest.fixture(scope="module", params=["latent", "pixel"])
def flow_pipe(request, tiny_sd3_dir, tiny_sd3_pixel_dir):
    """A tiny SD3 pipeline (with a VAE, and pixel-space as the embedded flow model) with a LoRA whose B
    weights are non-zero, so the adapter takes part in every forward pass."""
    pipe = load_pipeline(tiny_sd3_dir if request.param == "latent" else tiny_sd3_pixel_dir)
    torch.manual_seed(0)
    params = add_lora(denoiser(pipe), 4, 4.0, ["to_q", "to_k", "to_v", "to_out.0"])
    with torch.no_grad():
        for name, p in denoiser(pipe).named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    return pipe, params


def sample(pipe, seed=0, **options) -> Trajectories:
    return sample_trajectories(pipe, PROMPTS, num_steps=STEPS, guidance_scale=3.0, noise_level=0.7,
                               generator=torch.Generator().manual_seed(seed), **options)


def test_flow_trajectories_hold_what_ppo_and_coca_need(flow_pipe):
    pipe, _ = flow_pipe
    trajectories = sample(pipe)
    channels, size = denoiser(pipe).config.in_channels, denoiser(pipe).config.sample_size
    assert trajectories.latents.shape == (4, STEPS + 1, channels, size, size)
    assert trajectories.cosines.shape == (4, STEPS)
    # Each step's clean guess nears the final sample; the last step's (sigma to 0) all but is it.
    cosines = trajectories.cosines
    assert (cosines[:, -1] > cosines[:, 0]).all() and cosines[:, -1].min() > 0.999
    assert trajectories.pooled_prompt_embeds.shape[0] == 4 and trajectories.negative_pooled_prompt_embeds.shape[0] == 1
    assert torch.isfinite(trajectories.log_probs).all() and (trajectories.log_probs != 0).all()
    assert trajectories.images.flatten(1).std(1).min() > 0.05  # clamped to [0, 1], yet not blank or saturated
    # The flow scheduler's timesteps are 1000 sigma; x0 = x_t - sigma v is the model's clean guess.
    pipe.scheduler.set_timesteps(STEPS)
    torch.testing.assert_close(trajectories.timesteps, pipe.scheduler.timesteps)
    # Same seed, same trajectories; another seed, other noise.
    assert torch.equal(sample(pipe).latents, trajectories.latents)
    assert not torch.equal(sample(pipe, seed=1).latents, trajectories.latents)


def test_ppo_rescoring_reproduces_the_stored_log_probs(flow_pipe):
    """Scoring the stored actions with unchanged weights gives the sampling log-probs (ratio 1), with
    steps mixed across rows as PPO batches them."""
    pipe, _ = flow_pipe
    trajectories = sample(pipe)
    policy = StepPolicy(pipe.scheduler, noise_level=0.7)
    policy.set_timesteps(STEPS, "cpu")
    rows = torch.arange(4)
    for shift in range(STEPS):
        step = (torch.arange(4) + shift) % STEPS
        with torch.no_grad():
            log_prob, _ = score_actions(denoiser(pipe), policy, trajectories, rows, step, guidance_scale=3.0,
                                        device=torch.device("cpu"), dtype=torch.float32)
        torch.testing.assert_close(log_prob, trajectories.log_probs[rows, step], atol=1e-5, rtol=1e-5)


def test_sde_window_samples_ode_steps_outside_it(flow_pipe):
    pipe, _ = flow_pipe
    window = (2, 4)
    first, second = sample(pipe, seed=0, sde_window=window), sample(pipe, seed=1, sde_window=window)
    assert first.sde_window == window and list(first.stochastic_steps) == [2, 3]
    assert (first.log_probs[:, [0, 1, 4, 5]] == 0).all() and (first.log_probs[:, 2:4] != 0).all()
    # Steps before the window are deterministic: only the initial noise differs between seeds, so
    # the same starting noise gives the same states up to the window.
    same_start = sample_trajectories(pipe, PROMPTS, num_steps=STEPS, guidance_scale=3.0, sde_window=window,
                                     generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(same_start.latents[:, :3], first.latents[:, :3], rtol=0, atol=0)
    assert not torch.equal(second.latents[:, 0], first.latents[:, 0])
    with pytest.raises(ValueError, match="different sde_window"):
        Trajectories.concat([first, sample(pipe)])


def test_update_trains_only_the_window(flow_pipe):
    """Advantages outside the window never reach the gradient; inside it they do."""
    pipe, params = flow_pipe
    trajectories = sample(pipe, sde_window=(2, 4))
    outside = torch.zeros(4, STEPS)
    outside[:, [0, 1, 4, 5]] = torch.tensor([1.0, -1.0, 0.5, -0.5]).unsqueeze(1)
    inside = torch.zeros(4, STEPS)
    inside[:, 2:4] = torch.tensor([1.0, -1.0, 0.5, -0.5]).unsqueeze(1)

    def gradient(advantages):
        optimizer = GradientRecorder(params)
        info = ppo_update(denoiser(pipe), pipe.scheduler, optimizer, params, trajectories, advantages, TRAIN,
                          eta=1.0, noise_level=0.7, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
        return optimizer.grads[0], info

    grad_outside, _ = gradient(outside)
    grad_inside, info = gradient(inside)
    assert grad_outside.abs().max() == 0
    assert grad_inside.abs().max() > 0 and info["optimizer_steps"] == 1
    assert info["ratio_mean"] == pytest.approx(1.0, abs=1e-5)  # on-policy: the stored log-probs are exact


def test_resolution_sets_the_sample_size(tiny_sd3_dir):
    """sample.resolution: SD3.5 trains at 512 px though its transformer's default is 1024."""
    pipe = load_pipeline(tiny_sd3_dir)  # VAE downscales by 2, patches are 2 latent pixels
    trajectories = sample_trajectories(pipe, PROMPTS[:2], num_steps=2, guidance_scale=1.0, resolution=24,
                                       generator=torch.Generator().manual_seed(0))
    assert trajectories.latents.shape[-2:] == (12, 12) and trajectories.images.shape[-2:] == (24, 24)
    with pytest.raises(ValueError, match="sample.resolution: 10 is not a multiple of 4"):
        sample_trajectories(pipe, PROMPTS[:2], num_steps=2, guidance_scale=1.0, resolution=10)


@pytest.mark.parametrize("credit_mode", ["sparse", "uniform", "coca"])
@pytest.mark.parametrize("advantages", ["per_prompt", "group"])
def test_every_credit_mode_and_advantage_trains_the_embedded_flow_model(credit_mode, advantages):
    """The in-process loop on configs/tiny-flow.yaml: two epochs of each credit x advantage pair, with
    an SDE window, change the LoRA and report finite statistics, those of the pair asked for."""
    from dense_rl.config import load_config
    from dense_rl.diffusion.lora import lora_state_dict
    from dense_rl.training.trainer import train

    config = load_config("configs/tiny-flow.yaml", [
        "run.num_epochs=2", "sample.num_steps=10", "sample.batch_size=8", "sample.num_batches_per_epoch=1",
        "train.batch_size=8", f"credit.mode={credit_mode}", f"credit.advantages={advantages}",
        "sample.sde_window=[0, 5]",
    ])
    holder = {}
    history = train(config, show_progress=False, keep_policy=holder)
    assert len(history) == 2
    for metrics in history:
        assert all(torch.isfinite(torch.tensor(float(v))) for k, v in metrics.items() if isinstance(v, (int, float)))
        assert metrics["learner_optimizer_steps"] == 1 and metrics["learner_ratio_mean"] == pytest.approx(1.0, abs=1e-4)
        # The pair asked for is the pair that ran: the mode's credit, the advantages' normaliser.
        assert metrics["adv_step_adv_std"] > 0 and ("adv_group_size_mean" in metrics) == (advantages == "group")
        if credit_mode == "sparse":
            assert "adv_credit_first_window" not in metrics and "step_weight_mean_per_step" not in metrics
        else:  # windows of 5 of the 10 steps: uniform credit gives each half; coca's cosine gains do not
            assert (metrics["adv_credit_first_window"] == pytest.approx(0.5)) == (credit_mode == "uniform")
    lora = lora_state_dict(denoiser(holder["pipe"]))
    assert any(key.endswith("lora_B.weight") and value.abs().max() > 0 for key, value in lora.items())
