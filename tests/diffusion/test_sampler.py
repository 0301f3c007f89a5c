"""The one loader and the trajectory sampler, on a tiny SD-shaped pipeline the test builds."""

import pytest
import torch
from diffusers import DDIMScheduler

from dense_rl.algo.credit import cosine_to_final
from dense_rl.diffusion.ddim import ddim_step_with_logprob
from dense_rl.diffusion.pipeline import decode_to_images, encode_prompts, latent_shape, load_pipeline
from dense_rl.diffusion.policy import StepPolicy, guided_model_output
from dense_rl.diffusion.sampler import sample_trajectories
from dense_rl.diffusion.trajectories import PromptEmbeds, Trajectories
from dense_rl.training.update import score_actions
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
    assert trajectories.cosines.shape == (3, 6)
    # Each step's predicted clean sample nears the final one: the cosine rises to almost 1 at the last step.
    cosines = trajectories.cosines
    assert (cosines[:, -1] > cosines[:, 0]).all() and cosines[:, -1].min() > 0.99
    assert trajectories.log_probs.shape == (3, 6) and torch.isfinite(trajectories.log_probs).all()
    assert trajectories.images.shape == (3, 3, 16, 16)  # decoded by the VAE (2x upsampling)
    # The decoder clamps to [0, 1]; a blank or saturated image would have no spread left.
    assert trajectories.images.flatten(1).std(1).min() > 0.05
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
    trajectories = _sample(sd_pipe, boundaries="x0", window_size=3)
    assert trajectories.boundary_images.shape == (3, 2, 3, 16, 16)  # x0 at steps 0 and 3, through the VAE
    assert trajectories.boundary_images.flatten(2).std(2).min() > 0.05  # decoded pictures, not blank
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
    """PPO's score_actions on the stored actions with unchanged weights gives the sampling log-probs
    (ratio 1), with steps mixed across rows and rows in shuffled order, as PPO batches them."""
    trajectories = _sample(sd_pipe)
    policy = StepPolicy(sd_pipe.scheduler, eta=1.0)
    policy.set_timesteps(trajectories.num_steps, "cpu")
    rows = torch.tensor([2, 0, 1])
    for shift in range(trajectories.num_steps):
        step = (torch.tensor([4, 0, 2]) + shift) % trajectories.num_steps
        with torch.no_grad():
            log_prob, _ = score_actions(sd_pipe.unet, policy, trajectories, rows, step, guidance_scale=4.0,
                                        device=torch.device("cpu"), dtype=torch.float32)
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


def test_ode_boundaries_complete_each_boundary_state_by_deterministic_steps(sd_pipe):
    """`boundaries: ode`: the image at boundary k is the state before step k taken to the end by eta-0 DDIM
    steps. From step 0 that is the deterministic sample of the same noise; from step 3, a loop of
    diffusers' own DDIMScheduler.step (eta 0) from the stored state. 6 + 3 extra calls per trajectory."""
    trajectories = _sample(sd_pipe, boundaries="ode", window_size=3)
    assert trajectories.boundary_images.shape == (3, 2, 3, 16, 16) and trajectories.boundary_model_calls == 9
    assert trajectories.boundary_seconds > 0
    deterministic = _sample(sd_pipe, deterministic=True)
    torch.testing.assert_close(trajectories.boundary_images[:, 0], deterministic.images, atol=1e-5, rtol=1e-5)

    scheduler = DDIMScheduler.from_config(sd_pipe.scheduler.config)
    scheduler.set_timesteps(6)
    embeds, negative = encode_prompts(sd_pipe, PROMPTS), encode_prompts(sd_pipe, [""])
    negative = PromptEmbeds(negative.embeds.expand(3, -1, -1))
    x = trajectories.latents[:, 3]
    for t in scheduler.timesteps[3:]:
        output = guided_model_output(sd_pipe.unet, x, t.expand(3), embeds, negative, 4.0)
        x = scheduler.step(output, t, x, eta=0.0).prev_sample
    torch.testing.assert_close(trajectories.boundary_images[:, 1], decode_to_images(sd_pipe, x), atol=1e-4, rtol=1e-4)
