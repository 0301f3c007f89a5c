"""The embedded tiny text-to-image model, through the same loader and sampler as Stable Diffusion."""

import pytest
import torch
from diffusers import DDIMScheduler

from dense_rl.diffusion.pipeline import load_pipeline
from dense_rl.diffusion.sampler import sample_trajectories
from dense_rl.models.tiny.data import COLOR_NAMES, parse_prompt
from dense_rl.rewards.tiny import DigitAlignmentReward
from dense_rl.training.prompts import load_prompts


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("embedded:tiny")


def test_embedded_model_loads_in_pixel_space(pipe):
    assert pipe.vae is None and isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.set_alpha_to_one is False
    assert pipe.unet.config.in_channels == 3 and pipe.unet.config.sample_size == 16


def test_samples_look_like_the_prompt(pipe):
    """At the default guidance the digit classifier recognises the prompted digit in well over half
    of the samples, on prompts from templates the RL prompt set never uses."""
    prompts = load_prompts("embedded:tiny_heldout")  # 60 prompts: every digit x colour
    trajectories = sample_trajectories(pipe, prompts, num_steps=20, guidance_scale=4.0, eta=1.0,
                                       generator=torch.Generator().manual_seed(0))
    digit_probs, colour_probs = DigitAlignmentReward().predict(trajectories.images)
    wanted = [parse_prompt(p) for p in prompts]
    digit_accuracy = (digit_probs.argmax(1) == torch.tensor([d for d, _ in wanted])).float().mean()
    assert digit_accuracy > 0.7, f"digit accuracy {digit_accuracy:.2f}"
    colour_index = torch.tensor([COLOR_NAMES.index(c) for _, c in wanted])
    assert (colour_probs.argmax(1) == colour_index).float().mean() > 0.8
