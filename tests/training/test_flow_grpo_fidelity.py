"""Flow-GRPO's settings, as the SD 3.5 presets use them: its KL form, training a window of the sampled
steps (never the last), evaluation by the ODE at its own steps and guidance, and groups whose
advantages are all zero leaving the update."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from dense_rl.config import ConfigError, TrainConfig, load_config
from dense_rl.config.preflight import check_family_settings, model_folder
from dense_rl.diffusion.lora import add_lora
from dense_rl.diffusion.pipeline import denoiser, load_pipeline
from dense_rl.diffusion.sampler import sample_trajectories
from dense_rl.training.recipe import evaluation_sampler_options, rows_with_signal
from dense_rl.training.update import ppo_update
from support.training import GradientRecorder

PROMPTS = ["a red cat", "a blue dog", "a cat", "a dog"]
STEPS = 6
NOISE = 0.7
TRAIN = TrainConfig(batch_size=4, clip_range=10.0, adv_clip_max=10.0, max_grad_norm=1e9)


@pytest.fixture(scope="module")
def flow_pipe(tiny_sd3_pixel_dir):
    """The tiny pixel-space SD3 pipeline with a LoRA whose B weights are not zero: the policy is not the reference."""
    pipe = load_pipeline(tiny_sd3_pixel_dir)
    torch.manual_seed(0)
    params = add_lora(denoiser(pipe), 4, 4.0, ["to_q", "to_k", "to_v", "to_out.0"])
    with torch.no_grad():
        for name, p in denoiser(pipe).named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    return pipe, params


def sample(pipe, seed=0):
    return sample_trajectories(pipe, PROMPTS, num_steps=STEPS, guidance_scale=1.0, noise_level=NOISE,
                               generator=torch.Generator().manual_seed(seed))


def update(pipe, params, trajectories, train, advantages=None):
    optimizer = GradientRecorder(params)
    advantages = torch.zeros(len(PROMPTS), STEPS) if advantages is None else advantages
    info = ppo_update(denoiser(pipe), pipe.scheduler, optimizer, params, trajectories, advantages, train, eta=1.0,
                      noise_level=NOISE, guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
    return info


def flow_grpo_kl(pipe, trajectories, k) -> tuple[float, float]:
    """Flow-GRPO's KL at step k, written out from its train_sd3.py and sde_step_with_logprob: the SDE means
    of the policy and of the reference (adapters off), (mean - mean_ref)^2 averaged over the sample and
    divided by 2 std_dev_t^2; and the step's |dt|."""
    model, scheduler = denoiser(pipe), pipe.scheduler
    scheduler.set_timesteps(STEPS)
    sigma, sigma_next = scheduler.sigmas[k], scheduler.sigmas[k + 1]
    dt = sigma_next - sigma
    std_dev_t = NOISE * torch.sqrt(sigma / (1 - torch.where(sigma == 1, scheduler.sigmas[1], sigma)))
    x = trajectories.latents[:, k]
    t = trajectories.timesteps[k].expand(len(PROMPTS))

    def mean(adapters: bool):
        (model.enable_adapters if adapters else model.disable_adapters)()
        with torch.no_grad():
            v = model(hidden_states=x, timestep=t, encoder_hidden_states=trajectories.prompt_embeds,
                      pooled_projections=trajectories.pooled_prompt_embeds).sample
        model.enable_adapters()
        return x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt

    kl = ((mean(True) - mean(False)) ** 2).flatten(1).mean(1) / (2 * std_dev_t**2)
    return float(kl.mean()), float(-dt)


@pytest.mark.parametrize("k", [0, 3, STEPS - 1])
def test_flow_grpo_kl_form_is_its_formula_and_the_exact_kl_times_dt(flow_pipe, k):
    pipe, params = flow_pipe
    trajectories = sample(pipe)
    only_step_k = dataclasses.replace(TRAIN, kl_beta=0.5, step_window=[k, k + 1])
    exact = update(pipe, params, trajectories, only_step_k)["kl_to_reference"]
    theirs = update(pipe, params, trajectories, dataclasses.replace(only_step_k, kl_form="flow_grpo"))["kl_to_reference"]
    expected, dt = flow_grpo_kl(pipe, trajectories, k)
    assert expected > 0
    assert theirs == pytest.approx(expected, rel=1e-4)
    assert exact == pytest.approx(expected / dt, rel=1e-4)  # the Gaussian KL: divided by std_dev_t^2 |dt|


def test_a_step_window_trains_those_steps_of_every_row_and_never_the_last(flow_pipe):
    """Flow-GRPO samples every step with the SDE and trains the first T - 1, in every row."""
    pipe, params = flow_pipe
    trajectories = sample(pipe)
    lookup = {trajectories.latents[row, k].numpy().tobytes(): (row, k)
              for row in range(len(PROMPTS)) for k in range(STEPS)}
    visits = []

    def record(module, args, kwargs):
        if torch.is_grad_enabled():
            visits.extend(lookup[x.detach().numpy().tobytes()] for x in kwargs["hidden_states"])

    handle = denoiser(pipe).register_forward_pre_hook(record, with_kwargs=True)
    try:
        update(pipe, params, trajectories, dataclasses.replace(TRAIN, step_window=[0, STEPS - 1]),
               advantages=torch.randn(len(PROMPTS), STEPS))
    finally:
        handle.remove()
    assert sorted(visits) == [(row, k) for row in range(len(PROMPTS)) for k in range(STEPS - 1)]


def test_flow_models_are_evaluated_by_the_ode_at_the_evaluation_settings(flow_pipe):
    """`evaluation.sampler: auto` on a flow model: deterministic Euler steps, as diffusers' own scheduler
    takes them, at `evaluation.num_steps` and `evaluation.guidance_scale` (not the training ones)."""
    pipe, _ = flow_pipe
    config = load_config("configs/tiny-flow.yaml", ["sample.num_steps=6", "credit.window_size=3", "evaluation.num_steps=4",
                                                    "evaluation.guidance_scale=1.0"])
    options = evaluation_sampler_options(config, pipe)
    evaluated = sample_trajectories(pipe, PROMPTS, **options, generator=torch.Generator().manual_seed(5))
    assert evaluated.num_steps == 4 and torch.equal(evaluated.log_probs, torch.zeros(len(PROMPTS), 4))

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(4)
    x = evaluated.latents[:, 0]
    for t in scheduler.timesteps:
        with torch.no_grad():
            v = denoiser(pipe)(hidden_states=x, timestep=t.expand(len(PROMPTS)), encoder_hidden_states=evaluated.prompt_embeds,
                               pooled_projections=evaluated.pooled_prompt_embeds).sample
        x = scheduler.step(v, t, x).prev_sample
    torch.testing.assert_close(evaluated.final_samples, x, rtol=1e-5, atol=1e-5)
    # The same noise sampled for training (the SDE) ends elsewhere.
    training = sample_trajectories(pipe, PROMPTS, num_steps=4, guidance_scale=1.0, noise_level=NOISE,
                                   generator=torch.Generator().manual_seed(5))
    assert torch.equal(training.latents[:, 0], evaluated.latents[:, 0])
    assert not torch.allclose(training.final_samples, evaluated.final_samples, atol=1e-3)


def test_ddim_models_keep_their_training_sampler_for_evaluation():
    config = load_config("configs/tiny.yaml")
    pipe = load_pipeline("embedded:tiny")
    options = evaluation_sampler_options(config, pipe)
    assert options["deterministic"] is False and options["eta"] == 1.0 and options["num_steps"] == 20
    assert evaluation_sampler_options(dataclasses.replace(config, evaluation=dataclasses.replace(
        config.evaluation, sampler="ode")), pipe)["deterministic"] is True


def test_rows_whose_advantages_are_all_zero_leave_the_update_unless_too_few_are_left():
    advantages = torch.tensor([[0.0, 0.0], [0.5, -0.1], [0.0, 0.0], [0.0, 1e-9]])
    assert rows_with_signal(advantages, min_rows=1).tolist() == [False, True, False, True]
    assert rows_with_signal(advantages, min_rows=3).tolist() == [True] * 4  # a learner rank would get none
    assert rows_with_signal(torch.zeros(2, 3), min_rows=1).tolist() == [True, True]


def test_a_group_of_tied_rewards_is_counted_and_trains_nothing(monkeypatch):
    """In the trainer: one prompt's group scores alike, so its advantages are all zero; its rows leave the
    update (half the epoch: one optimizer step of 4 instead of two) and are counted."""
    from dense_rl.rewards import WeightedRewards
    from dense_rl.training import trainer

    class TiedFirstGroup(WeightedRewards):
        def __call__(self, images, prompts):
            total, components = super().__call__(images, prompts)
            total = total.clone()
            total[[i for i, p in enumerate(prompts) if p == prompts[0]]] = 3.0
            return total, components

    overrides = ["run.num_epochs=1", "sample.num_steps=4", "sample.batch_size=8", "sample.num_batches_per_epoch=1",
                 "sample.samples_per_prompt=4", "train.batch_size=4", "credit.window_size=2"]
    config = load_config("configs/tiny-flow.yaml", overrides)
    (untied,) = trainer.train(config, show_progress=False)
    monkeypatch.setattr(trainer, "WeightedRewards", TiedFirstGroup)
    (tied,) = trainer.train(config, show_progress=False)
    assert (untied["adv_zero_rows"], untied["learner_optimizer_steps"]) == (0, 2)
    assert (tied["adv_zero_rows"], tied["learner_optimizer_steps"]) == (4, 1)


def test_the_flow_grpo_kl_form_is_refused_on_a_ddim_model_before_anything_starts():
    config = load_config("configs/tiny.yaml", ["train.kl_form=flow_grpo"])
    with pytest.raises(ConfigError, match=r"^train.kl_form: flow_grpo is Flow-GRPO's KL for flow-matching models"):
        check_family_settings(config, model_folder(config))
    flow = load_config("configs/tiny-flow.yaml", ["train.kl_form=flow_grpo"])
    check_family_settings(flow, model_folder(flow))  # fine on a flow model
