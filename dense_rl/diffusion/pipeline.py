"""Load a text-to-image pipeline: the embedded tiny model, a local diffusers folder, or a hub id.

One loader for all three, so the tiny model exercises exactly the code that loads Stable Diffusion.
The result is a plain `diffusers.StableDiffusionPipeline` (so `load_lora_weights` works on it) whose
scheduler is a `DDIMScheduler`, with every weight frozen; LoRA adds the only trainable parameters.
A pipeline without a VAE (the tiny model) diffuses in pixel space.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED_PREFIX = "embedded:"
# Components StableDiffusionPipeline declares that a model folder may leave out (null in model_index.json).
_OPTIONAL_COMPONENTS = ("vae", "safety_checker", "feature_extractor", "image_encoder")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_model(name_or_path: str) -> str:
    """Map "embedded:tiny" to the shipped folder; pass hub ids and local paths through."""
    if name_or_path.startswith(EMBEDDED_PREFIX):
        folder = ASSETS / f"{name_or_path[len(EMBEDDED_PREFIX):]}-t2i"
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(f"model.pretrained: no embedded model {name_or_path!r} (looked in {folder})")
        return str(folder)
    return name_or_path


def _model_index(name_or_path: str, revision: str | None) -> dict:
    local = Path(name_or_path)
    if local.is_dir():
        index = local / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(f"model.pretrained: {local} has no model_index.json; is it a diffusers pipeline folder?")
        return json.loads(index.read_text())
    return StableDiffusionPipeline.load_config(name_or_path, revision=revision)


def load_pipeline(
    name_or_path: str = "embedded:tiny",
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    revision: str | None = None,
) -> StableDiffusionPipeline:
    """Load, swap in DDIM, freeze, and move to `device`. No safety checker: rewards see raw samples."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    path = resolve_model(name_or_path)
    index = _model_index(path, revision)
    missing = {name: None for name in _OPTIONAL_COMPONENTS if index.get(name, [None, None])[0] is None}
    pipe = StableDiffusionPipeline.from_pretrained(
        path, revision=revision, dtype=dtype, requires_safety_checker=False, **missing
    )
    # DDIM is the policy; keep the model's own noise schedule (SD ships PNDM with the same betas).
    # The last step must have non-zero variance to have a log-density: alpha_prev = 1
    # (set_alpha_to_one) or ending at t = 0 with alpha_prev = alpha_0 (steps_offset 0) both give zero.
    fixes = {"set_alpha_to_one": False}
    if pipe.scheduler.config.get("timestep_spacing", "leading") == "leading":
        fixes["steps_offset"] = max(1, pipe.scheduler.config.get("steps_offset", 0))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, **fixes)
    for module in (pipe.unet, pipe.text_encoder, pipe.vae):
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def latent_shape(pipe: StableDiffusionPipeline) -> tuple[int, int, int]:
    """(channels, height, width) of the diffused sample: latents with a VAE, pixels without."""
    size = pipe.unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return pipe.unet.config.in_channels, height, width


@torch.no_grad()
def encode_prompts(pipe: StableDiffusionPipeline, prompts: list[str]) -> torch.Tensor:
    """Text embeddings [B, L, D] the UNet cross-attends to (the text encoder's last hidden state)."""
    tokens = pipe.tokenizer(
        list(prompts), padding="max_length", max_length=pipe.tokenizer.model_max_length,
        truncation=True, return_tensors="pt",
    )
    return pipe.text_encoder(tokens.input_ids.to(pipe.text_encoder.device))[0]


@torch.no_grad()
def decode_to_images(pipe: StableDiffusionPipeline, samples: torch.Tensor) -> torch.Tensor:
    """Final diffusion samples -> float32 RGB images [B, 3, H, W] in [0, 1]."""
    if pipe.vae is not None:
        samples = pipe.vae.decode(samples.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample
    return ((samples.float().clamp(-1, 1) + 1) / 2).cpu()
