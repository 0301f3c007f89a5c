"""The one loader and the trajectory sampler, on a tiny SD-shaped pipeline the test builds."""

import pytest
import torch
from diffusers import DDIMScheduler

from dense_rl.algo.credit import cosine_to_final
from dense_rl.diffusion.ddim import ddim_step_with_logprob
from dense_rl.diffusion.pipeline import latent_shape, load_pipeline
from dense_rl.diffusion.policy import guided_model_output
from dense_rl.diffusion.sampler import sample_trajectories
from dense_rl.diffusion.trajectories import Trajectories
from support.tiny_models import build_tiny_sd

PROMPTS = ["a red cat", "a blue dog", "a cat"]


@pytest.fixture(scope="module")
def sd_pipe(tiny_sd_dir):
    return load_pipeline(tiny_sd_dir)


def _sample(pipe, seed=0, **kwargs):
    options = dict(num_steps=6, guidance_scale=4.0, eta=1.0)
    options.update(kwargs)
    return sample_trajectories(pipe, PROMPTS, generator=torch.Generator().manual_seed(seed), **options)


def test_loader_builds_a_frozen_ddim_pipeline_with_vae(sd_pipe):
    assert isinstance(sd_pipe.scheduler, DDIMScheduler)  # the folder ships PNDM, as SD 1.5 does
    assert sd_pipe.vae is not None and sd_pipe.safety_checker is None
    assert not any(p.requires_grad for p in sd_pipe.unet.parameters())
    assert latent_shape(sd_pipe) == (4, 8, 8)


def test_loader_fixes_alpha_to_one(tmp_path):
    pipe = load_pipeline(build_tiny_sd(tmp_path, set_alpha_to_one=True))
    assert pipe.scheduler.config.set_alpha_to_one is False


def test_loader_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_pipeline(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no embedded model 'embedded:nope'"):
        load_pipeline("embedded:nope")


def test_trajectory_shapes_through_the_vae(sd_pipe):
    trajectories = _sample(sd_pipe)
    assert trajectories.latents.shape == (3, 7, 4, 8, 8)
    assert trajectories.cosines.shape == (3, 6) and trajectories.cosines.abs().max() <= 1 + 1e-6
    assert trajectories.log_probs.shape == (3, 6) and torch.isfinite(trajectories.log_probs).all()
    assert trajectories.images.shape == (3, 3, 16, 16)  # decoded by the VAE (2x upsampling)
    assert 0 <= trajectories.images.min() and trajectories.images.max() <= 1
    # One negative prompt embedding for the batch, as every row is guided by the same one.
    assert trajectories.timesteps.shape == (6,) and trajectories.negative_prompt_embeds.shape[0] == 1
    assert trajectories.boundary_images is None  # only reward_gain credit asks for them


def test_cosines_are_those_of_the_predicted_clean_samples(sd_pipe):
    """The rollout ships CoCA's cosine curve instead of the predicted x0s: recompute each step's x0
    from the stored state and compare its cosine to the final sample with the shipped one."""
    trajectories = _sample(sd_pipe)
    scheduler = sd_pipe.scheduler
    scheduler.set_timesteps(trajectories.num_steps)
    rows = torch.arange(3)
    embeds, negative = trajectories.embeds(rows, "cpu", torch.float32)
    x0_preds = []
    with torch.no_grad():
        for k in range(trajectories.num_steps):
            sample = trajectories.latents[:, k]
            timesteps = trajectories.timesteps[k].expand(3)
            output = guided_model_output(sd_pipe.unet, sample, timesteps, embeds, negative, 4.0)
            x0_preds.append(ddim_step_with_logprob(scheduler, output, timesteps, sample, 1.0,
                                                   prev_sample=trajectories.latents[:, k + 1])[2])
    expected = cosine_to_final(torch.stack(x0_preds, dim=1), trajectories.final_samples)
    torch.testing.assert_close(trajectories.cosines, expected, atol=1e-5, rtol=1e-5)


def test_reward_gain_decodes_the_window_boundaries(sd_pipe):
    trajectories = _sample(sd_pipe, decode_boundaries_every=3)
    assert trajectories.boundary_images.shape == (3, 2, 3, 16, 16)  # x0 at steps 0 and 3, through the VAE
    assert 0 <= trajectories.boundary_images.min() and trajectories.boundary_images.max() <= 1
    # The noisiest step's guess is not yet the final image.
    assert not torch.allclose(trajectories.boundary_images[:, 0], trajectories.images, atol=1e-3)
    inputs = trajectories.for_reward()
    assert inputs.boundary_images.dtype == torch.uint8 and inputs.boundary_images.shape == (3, 2, 3, 16, 16)


def test_each_role_gets_its_own_part(sd_pipe):
    trajectories = _sample(sd_pipe)
    learner = trajectories.for_learner()
    assert learner.images is None and learner.cosines is None
    assert torch.equal(learner.latents, trajectories.latents) and torch.equal(learner.log_probs, trajectories.log_probs)
    reward = trajectories.for_reward()
    assert reward.images.dtype == torch.uint8 and reward.prompts == PROMPTS
    assert (reward.images.float() / 255 - trajectories.images).abs().max() <= 0.5 / 255 + 1e-6
    assert torch.equal(reward.cosines, trajectories.cosines)


def test_sampling_is_seeded(sd_pipe):
    a, b, c = _sample(sd_pipe, seed=1), _sample(sd_pipe, seed=1), _sample(sd_pipe, seed=2)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)
    assert not torch.allclose(a.latents, c.latents)


def test_no_guidance_skips_negative_prompt(sd_pipe):
    trajectories = _sample(sd_pipe, guidance_scale=1.0)
    assert trajectories.negative_prompt_embeds is None


def test_stored_log_probs_are_reproduced_by_the_ppo_path(sd_pipe):
    """Scoring the stored actions with unchanged weights gives the sampling log-probs (PPO ratio 1),
    with one timestep per row in shuffled order."""
    trajectories = _sample(sd_pipe)
    scheduler = sd_pipe.scheduler
    scheduler.set_timesteps(trajectories.num_steps)
    step = torch.tensor([4, 0, 2])
    rows = torch.arange(3)
    sample = trajectories.latents[rows, step]
    timesteps = trajectories.timesteps[step]
    with torch.no_grad():
        embeds, negative = trajectories.embeds(rows, "cpu", torch.float32)
        noise_pred = guided_model_output(sd_pipe.unet, sample, timesteps, embeds, negative, 4.0)
    _, log_prob, _ = ddim_step_with_logprob(scheduler, noise_pred, timesteps, sample, 1.0,
                                            prev_sample=trajectories.latents[rows, step + 1])
    torch.testing.assert_close(log_prob, trajectories.log_probs[rows, step], atol=1e-4, rtol=1e-4)


def test_select_and_concat(sd_pipe):
    trajectories = _sample(sd_pipe)
    picked = trajectories.select(torch.tensor([2, 0]))
    assert picked.prompts == [PROMPTS[2], PROMPTS[0]]
    assert torch.equal(picked.latents[0], trajectories.latents[2])
    assert torch.equal(picked.negative_prompt_embeds, trajectories.negative_prompt_embeds)  # shared, not indexed
    joined = Trajectories.concat([picked, trajectories.select(slice(1, 2))])
    assert joined.batch_size == 3 and joined.prompts[-1] == PROMPTS[1]
    assert joined.negative_prompt_embeds.shape[0] == 1
    _, negative = joined.embeds(torch.tensor([0, 2]), "cpu", torch.float32)
    assert negative.embeds.shape[0] == 2  # broadcast to the rows asked for


def test_empty_prompts_rejected(sd_pipe):
    with pytest.raises(ValueError, match="prompts is empty"):
        sample_trajectories(sd_pipe, [], num_steps=2, guidance_scale=1.0)
