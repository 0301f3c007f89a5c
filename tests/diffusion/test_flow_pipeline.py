"""Flow-matching (SD3-class) pipelines through the one loader: tiny SD3-shaped pipelines the tests
build, LoRA on their transformer with diffusers' own loader as the judge, and the embedded tiny flow
model."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from safetensors import safe_open
from safetensors.torch import load_file

from dense_rl.diffusion.lora import add_lora, load_lora_state_dict, lora_state_dict, read_lora_file, save_lora
from dense_rl.diffusion.pipeline import (
    PromptEmbeds,
    decode_to_images,
    denoiser,
    encode_prompts,
    is_flow,
    latent_shape,
    load_pipeline,
)

PROMPTS = ["a red cat", "a blue dog", ""]
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def _transformer_output(transformer, seed=0):
    """One forward pass on fixed inputs (the call StableDiffusion3Pipeline makes: timestep = 1000 sigma)."""
    config = transformer.config
    generator = torch.Generator().manual_seed(seed)
    size = config.sample_size
    sample = torch.randn((2, config.in_channels, size, size), generator=generator)
    context = torch.randn((2, 24, config.joint_attention_dim), generator=generator)
    pooled = torch.randn((2, config.pooled_projection_dim), generator=generator)
    with torch.no_grad():
        return transformer(hidden_states=sample, timestep=torch.tensor([1000.0, 250.0]), encoder_hidden_states=context,
                           pooled_projections=pooled).sample


def _perturb(model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)


def _plain(folder):
    """The folder loaded by diffusers alone (no T5), for comparisons."""
    index = json.loads((Path(folder) / "model_index.json").read_text())
    vae = {} if index["vae"][0] else {"vae": None}
    return StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None, **vae)


@pytest.fixture(scope="module")
def sd3(tiny_sd3_dir):
    return load_pipeline(tiny_sd3_dir)


@pytest.fixture(scope="module")
def sd3_pixel(tiny_sd3_pixel_dir):
    return load_pipeline(tiny_sd3_pixel_dir)


def test_sd3_loads_frozen_with_its_flow_scheduler(sd3):
    assert isinstance(sd3, StableDiffusion3Pipeline)
    assert isinstance(sd3.transformer, SD3Transformer2DModel) and denoiser(sd3) is sd3.transformer
    assert isinstance(sd3.vae, AutoencoderKL) and sd3.text_encoder_3 is None and sd3.tokenizer_3 is None
    assert isinstance(sd3.scheduler, FlowMatchEulerDiscreteScheduler)
    assert sd3.scheduler.config.shift == 3.0  # the model's own schedule, not a default
    assert is_flow(sd3)
    modules = [sd3.transformer, sd3.text_encoder, sd3.text_encoder_2, sd3.vae]
    assert not any(p.requires_grad for m in modules for p in m.parameters())
    assert not any(m.training for m in modules)
    assert latent_shape(sd3) == (4, 8, 8)


def test_sd3_without_vae_diffuses_pixels(sd3_pixel):
    assert sd3_pixel.vae is None and is_flow(sd3_pixel)
    assert latent_shape(sd3_pixel) == (3, 8, 8)
    x = torch.linspace(-1.5, 1.5, 2 * 3 * 8 * 8).reshape(2, 3, 8, 8)
    torch.testing.assert_close(decode_to_images(sd3_pixel, x), (x.clamp(-1, 1) + 1) / 2)


def test_sd1_pipelines_are_unchanged(tiny_sd_dir):
    pipe = load_pipeline(tiny_sd_dir)
    assert not is_flow(pipe) and denoiser(pipe) is pipe.unet
    embeds = encode_prompts(pipe, PROMPTS)
    assert isinstance(embeds, PromptEmbeds) and embeds.pooled is None
    assert embeds.embeds.shape == (3, 24, 32)
    assert embeds.to(torch.float16).embeds.dtype == torch.float16


def test_sd3_prompt_embeddings_are_diffusers_own(sd3):
    embeds = encode_prompts(sd3, PROMPTS)
    # no T5: the two CLIP encoders' tokens (24) and no zero T5 tokens; width = joint_attention_dim
    assert embeds.embeds.shape == (3, 24, 64) and embeds.pooled.shape == (3, 64)
    ref, _, ref_pooled, _ = sd3.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False,
                                              max_sequence_length=0)
    torch.testing.assert_close(embeds.embeds, ref, rtol=0, atol=0)
    torch.testing.assert_close(embeds.pooled, ref_pooled, rtol=0, atol=0)
    # diffusers' zero T5 padding, when asked for
    padded = encode_prompts(sd3, PROMPTS, max_sequence_length=5)
    assert padded.embeds.shape == (3, 29, 64) and padded.embeds[:, 24:].abs().max() == 0
    torch.testing.assert_close(padded.embeds[:, :24], embeds.embeds)
    both = PromptEmbeds.cat([embeds, embeds.to(torch.float32)])
    assert both.embeds.shape[0] == 6 and both.pooled.shape == (6, 64) and len(both) == 6


def test_sd3_decodes_through_its_vae_with_shift(sd3):
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    images = decode_to_images(sd3, latents)
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float32
    config = sd3.vae.config
    with torch.no_grad():
        expected = sd3.vae.decode(latents / config.scaling_factor + config.shift_factor).sample
    torch.testing.assert_close(images, (expected.clamp(-1, 1) + 1) / 2)


def test_sd3_timesteps_are_1000_sigma(sd3):
    sd3.scheduler.set_timesteps(10)
    torch.testing.assert_close(sd3.scheduler.timesteps, sd3.scheduler.sigmas[:-1] * 1000)
    assert sd3.scheduler.sigmas[0] == 1.0 and sd3.scheduler.sigmas[-1] == 0.0


def test_unknown_pipeline_class_is_a_clear_error(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match=r"model.pretrained: .* is a FluxPipeline; supported pipelines: StableDiffusionPipeline"):
        load_pipeline(str(tmp_path))


def test_sd3_lora_round_trips_through_diffusers(tiny_sd3_dir, tmp_path):
    pipe = load_pipeline(tiny_sd3_dir)
    base = _transformer_output(pipe.transformer)
    params = add_lora(pipe.transformer, 4, 8.0, TARGETS)
    assert params and all(p.dtype == torch.float32 for p in params)
    assert {id(p) for p in params} == {id(p) for p in pipe.transformer.parameters() if p.requires_grad}
    torch.testing.assert_close(_transformer_output(pipe.transformer), base)  # B = 0: the base model
    _perturb(pipe.transformer)
    ours = _transformer_output(pipe.transformer)
    assert not torch.allclose(ours, base, atol=1e-4)

    path = save_lora(pipe.transformer, tmp_path / "lora")
    assert path.name == "pytorch_lora_weights.safetensors"
    keys = set(load_file(str(path)))
    assert keys and all(k.startswith("transformer.") for k in keys)
    assert any(".attn.add_q_proj.lora_A." in k for k in keys) and any(".attn.to_add_out.lora_B." in k for k in keys)
    with safe_open(str(path), framework="pt") as file:
        stored = json.loads(file.metadata()["lora_adapter_metadata"])
    assert stored["transformer.r"] == 4 and stored["transformer.lora_alpha"] == 8.0
    assert stored["transformer.target_modules"] == sorted(TARGETS)

    plain = _plain(tiny_sd3_dir)
    torch.testing.assert_close(_transformer_output(plain.transformer), base)
    plain.load_lora_weights(str(tmp_path / "lora"))  # diffusers' own SD3 loader, at the stored alpha
    torch.testing.assert_close(_transformer_output(plain.transformer), ours, atol=1e-5, rtol=1e-4)

    # ... our reader gives back the same adapter state, which loads into a fresh adapter
    reread = read_lora_file(tmp_path / "lora")
    assert set(read_lora_file(path, component="transformer")) == set(reread)
    original = lora_state_dict(pipe.transformer)
    assert set(reread) == set(original)
    for key in original:
        torch.testing.assert_close(reread[key], original[key])
    other = load_pipeline(tiny_sd3_dir)
    add_lora(other.transformer, 4, 8.0, TARGETS)
    load_lora_state_dict(other.transformer, reread)
    torch.testing.assert_close(_transformer_output(other.transformer), ours)


def test_sd3_lora_unknown_target_is_rejected(sd3_pixel):
    with pytest.raises(ValueError, match="lora.target_modules"):
        add_lora(sd3_pixel.transformer, 4, 4.0, ["no_such_layer"])


def test_lora_reader_names_the_missing_component(tmp_path):
    from dense_rl.diffusion.lora import lora_state_from_diffusers

    state = {"transformer.a.lora_A.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="no unet LoRA weights"):
        lora_state_from_diffusers(state, source="x", component="unet")
    assert set(lora_state_from_diffusers(state, source="x")) == {"a.lora_A.weight"}


# ----------------------------------------------------------------------------------------------
# The embedded tiny flow model
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_flow():
    return load_pipeline("embedded:tiny-flow")


def test_embedded_flow_model_loads_in_pixel_space(tiny_flow):
    assert isinstance(tiny_flow, StableDiffusion3Pipeline) and is_flow(tiny_flow)
    assert tiny_flow.vae is None and tiny_flow.text_encoder_3 is None
    assert latent_shape(tiny_flow) == (3, 16, 16)
    assert tiny_flow.scheduler.config.shift == 1.0
    embeds = encode_prompts(tiny_flow, ["a red digit seven", ""])
    assert embeds.embeds.shape == (2, 16, 64) and embeds.pooled.shape == (2, 64)


def test_embedded_flow_conditioning_is_what_it_was_trained_on(tiny_flow):
    from dense_rl.models.tiny.train.pretrain import tokenize
    from dense_rl.models.tiny.train.pretrain_flow import text_conditioning

    prompts = ["a red digit seven", "the number 3 in blue", ""]
    embeds, pooled = text_conditioning([tiny_flow.text_encoder, tiny_flow.text_encoder_2],
                                       tokenize(tiny_flow.tokenizer, prompts),
                                       tiny_flow.transformer.config.joint_attention_dim)
    ours = encode_prompts(tiny_flow, prompts)
    torch.testing.assert_close(ours.embeds, embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours.pooled, pooled, rtol=0, atol=0)


def test_embedded_flow_model_draws_the_prompted_digit(tiny_flow):
    """diffusers' own StableDiffusion3Pipeline.__call__ (Euler ODE, CFG) draws digits the shipped
    classifier reads as the prompted one far above chance (10%), and the training script's sampler
    takes exactly the same steps."""
    from dense_rl.models.tiny.data import parse_prompt
    from dense_rl.models.tiny.train.pretrain_flow import sample
    from dense_rl.rewards.tiny import DigitAlignmentReward
    from dense_rl.training.prompts import load_prompts

    prompts = load_prompts("embedded:tiny_heldout")[::3]  # 20 prompts, every digit twice
    assert len(prompts) == 20
    latents = tiny_flow(prompts, num_inference_steps=12, guidance_scale=4.0, max_sequence_length=0,
                        output_type="latent", generator=torch.Generator().manual_seed(0)).images
    images = decode_to_images(tiny_flow, latents)
    assert images.shape == (20, 3, 16, 16)
    digit_probs, _ = DigitAlignmentReward().predict(images)
    wanted = torch.tensor([parse_prompt(p)[0] for p in prompts])
    accuracy = (digit_probs.argmax(1) == wanted).float().mean()
    assert accuracy >= 0.6, f"digit accuracy {accuracy:.2f}"

    ours = sample(tiny_flow, prompts, guidance_scale=4.0, num_steps=12, seed=0)
    torch.testing.assert_close(ours, images, atol=1e-4, rtol=0)
