"""LoRA: starts as the base model, moves as tensors, exports a file diffusers loads."""

import json

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dense_rl.diffusion.lora import add_lora, load_lora_state_dict, lora_state_dict, read_lora_file, save_lora
from dense_rl.diffusion.pipeline import load_pipeline

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _unet_output(unet, seed=0):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn((2, 4, 8, 8), generator=generator)
    context = torch.randn((2, 24, 32), generator=generator)
    with torch.no_grad():
        return unet(sample, torch.tensor([500, 20]), encoder_hidden_states=context).sample


def _perturb(unet, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)


@pytest.fixture
def pipe(tiny_sd_dir):
    return load_pipeline(tiny_sd_dir)


def test_fresh_adapter_is_the_base_model_and_only_it_trains(pipe):
    base = _unet_output(pipe.unet)
    params = add_lora(pipe.unet, 4, 4.0, TARGETS)
    assert params and all(p.dtype == torch.float32 for p in params)
    assert {id(p) for p in params} == {id(p) for p in pipe.unet.parameters() if p.requires_grad}
    torch.testing.assert_close(_unet_output(pipe.unet), base)
    _perturb(pipe.unet)
    assert not torch.allclose(_unet_output(pipe.unet), base, atol=1e-4)


def test_state_round_trip_between_two_unets(pipe, tiny_sd_dir):
    add_lora(pipe.unet, 4, 4.0, TARGETS)
    _perturb(pipe.unet)
    other = load_pipeline(tiny_sd_dir)
    add_lora(other.unet, 4, 4.0, TARGETS)
    load_lora_state_dict(other.unet, lora_state_dict(pipe.unet))
    torch.testing.assert_close(_unet_output(other.unet), _unet_output(pipe.unet))


def test_wrong_rank_is_rejected_with_the_reason(pipe, tiny_sd_dir):
    add_lora(pipe.unet, 4, 4.0, TARGETS)
    other = load_pipeline(tiny_sd_dir)
    add_lora(other.unet, 8, 8.0, TARGETS)
    with pytest.raises(ValueError, match="lora.rank"):
        load_lora_state_dict(other.unet, lora_state_dict(pipe.unet))


def test_unknown_target_module_is_rejected(pipe):
    with pytest.raises(ValueError, match="lora.target_modules"):
        add_lora(pipe.unet, 4, 4.0, ["no_such_layer"])


def test_exported_file_loads_into_diffusers_and_changes_outputs(pipe, tiny_sd_dir, tmp_path):
    add_lora(pipe.unet, 4, 4.0, TARGETS)
    _perturb(pipe.unet)
    path = save_lora(pipe.unet, tmp_path / "lora")
    assert path.name == "pytorch_lora_weights.safetensors"

    plain = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    base = _unet_output(plain.unet)
    plain.load_lora_weights(str(tmp_path / "lora"))  # diffusers' own loader
    with_lora = _unet_output(plain.unet)
    assert not torch.allclose(with_lora, base, atol=1e-4)
    torch.testing.assert_close(with_lora, _unet_output(pipe.unet), atol=1e-5, rtol=1e-4)

    # ... and our reader gives back the same adapter state.
    reread = read_lora_file(tmp_path / "lora")
    original = lora_state_dict(pipe.unet)
    assert set(reread) == set(original)
    for key in original:
        torch.testing.assert_close(reread[key], original[key])


def test_missing_lora_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no LoRA weights"):
        read_lora_file(tmp_path)


def _images(pipe, seed=0):
    """diffusers' own pipeline call: same prompt, same noise, 3 DDIM steps."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return pipe(["a red seven", "a blue two"], num_inference_steps=3, guidance_scale=3.0, eta=1.0,
                    generator=generator, output_type="pt").images


def test_exported_lora_keeps_its_alpha_in_diffusers(pipe, tiny_sd_dir, tmp_path):
    # alpha = 2 x rank: diffusers applies the adapter at scale 2 only if the file says so.
    add_lora(pipe.unet, 4, 8.0, TARGETS)
    _perturb(pipe.unet)
    path = save_lora(pipe.unet, tmp_path / "lora")
    with safe_open(str(path), framework="pt") as file:
        stored = json.loads(file.metadata()["lora_adapter_metadata"])
    assert stored["unet.r"] == 4 and stored["unet.lora_alpha"] == 8.0 and stored["unet.target_modules"] == sorted(TARGETS)

    plain = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    plain.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # load_pipeline's DDIM, exactly
    plain.set_progress_bar_config(disable=True)
    base = _images(plain)
    plain.load_lora_weights(str(tmp_path / "lora"))
    ours = _images(pipe)
    assert (ours - base).abs().max() > 1e-2  # the adapter visibly changes the image
    torch.testing.assert_close(_images(plain), ours, atol=1e-5, rtol=1e-4)


def test_lora_files_without_metadata_still_read(pipe, tmp_path):
    """Files written before the adapter metadata (or by other tools) load into our adapter as before."""
    add_lora(pipe.unet, 4, 8.0, TARGETS)
    _perturb(pipe.unet)
    path = save_lora(pipe.unet, tmp_path / "with")
    bare = tmp_path / "without" / path.name
    bare.parent.mkdir()
    save_file(load_file(str(path)), str(bare))  # same tensors, no metadata
    for folder in (tmp_path / "with", tmp_path / "without"):
        reread = read_lora_file(folder)
        for key, value in lora_state_dict(pipe.unet).items():
            torch.testing.assert_close(reread[key], value)
