"""Load a text-to-image pipeline: the embedded tiny models, a local diffusers folder, or a hub id.

One loader for all of them, so the tiny models exercise exactly the code that loads Stable Diffusion.
The folder's model_index.json says which family it is:

- `StableDiffusionPipeline` (SD 1.x/2.x, `embedded:tiny`): a UNet, one CLIP text encoder; the scheduler
  is swapped for a `DDIMScheduler` with the model's own noise schedule.
- `StableDiffusion3Pipeline` (SD3/3.5, `embedded:tiny-flow`): a `SD3Transformer2DModel` (rectified
  flow), two CLIP text encoders with projection and an optional T5; the model's own
  `FlowMatchEulerDiscreteScheduler` (shift etc.) is kept.

The result is the plain diffusers pipeline (so `load_lora_weights` works on it) with every weight
frozen and in eval mode; LoRA adds the only trainable parameters. Components a folder leaves out (null
in model_index.json, or not listed) load as None, as diffusers allows; a pipeline without a VAE (the
tiny models) diffuses in pixel space.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
)

from dense_rl import ASSETS
from dense_rl.config import Config
from dense_rl.diffusion.lora import add_lora, load_lora_state_dict, read_lora_file
from dense_rl.diffusion.trajectories import PromptEmbeds

EMBEDDED_PREFIX = "embedded:"
# Components a model folder may leave out (null in model_index.json, or absent), per pipeline class.
_OPTIONAL_COMPONENTS = ("vae", "safety_checker", "feature_extractor", "image_encoder")
_SD3_OPTIONAL_COMPONENTS = ("vae", "text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor")
PIPELINE_CLASSES = ("StableDiffusionPipeline", "StableDiffusion3Pipeline")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# diffusers' default T5 length (StableDiffusion3Pipeline.__call__'s max_sequence_length).
T5_MAX_SEQUENCE_LENGTH = 256


def resolve_model(name_or_path: str) -> str:
    """Map "embedded:NAME" to the shipped folder assets/NAME-t2i; pass hub ids and local paths through."""
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
    return DiffusionPipeline.load_config(name_or_path, revision=revision)


def _absent(index: dict, names: tuple[str, ...]) -> dict:
    """{name: None} for the components the index leaves out or sets to null."""
    return {name: None for name in names if (index.get(name) or [None, None])[0] is None}


def load_pipeline(
    name_or_path: str = "embedded:tiny",
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    revision: str | None = None,
) -> StableDiffusionPipeline | StableDiffusion3Pipeline:
    """Load, set the policy's scheduler, freeze, and move to `device`. No safety checker: rewards see
    raw samples. SD 1.x/2.x get DDIM; SD3 keeps its FlowMatchEulerDiscreteScheduler."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    path = resolve_model(name_or_path)
    index = _model_index(path, revision)
    class_name = index.get("_class_name")
    if class_name == "StableDiffusionPipeline":
        pipe = _load_sd(path, index, dtype, revision)
    elif class_name == "StableDiffusion3Pipeline":
        pipe = _load_sd3(path, index, dtype, revision)
    else:
        raise ValueError(f"model.pretrained: {name_or_path!r} is a {class_name or 'pipeline without _class_name'}; "
                         f"supported pipelines: {', '.join(PIPELINE_CLASSES)}")
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _load_sd(path: str, index: dict, dtype: torch.dtype, revision: str | None) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(
        path, revision=revision, dtype=dtype, requires_safety_checker=False, **_absent(index, _OPTIONAL_COMPONENTS)
    )
    # DDIM is the policy; keep the model's own noise schedule (SD ships PNDM with the same betas).
    # The last step must have non-zero variance to have a log-density: alpha_prev = 1
    # (set_alpha_to_one) or ending at t = 0 with alpha_prev = alpha_0 (steps_offset 0) both give zero.
    fixes = {"set_alpha_to_one": False}
    if pipe.scheduler.config.get("timestep_spacing", "leading") == "leading":
        fixes["steps_offset"] = max(1, pipe.scheduler.config.get("steps_offset", 0))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, **fixes)
    return pipe


def _load_sd3(path: str, index: dict, dtype: torch.dtype, revision: str | None) -> StableDiffusion3Pipeline:
    pipe = StableDiffusion3Pipeline.from_pretrained(
        path, revision=revision, dtype=dtype, **_absent(index, _SD3_OPTIONAL_COMPONENTS)
    )
    if not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):  # same config (shift, ...), the flow scheduler
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return pipe


def build_policy(config: Config):
    """The frozen pipeline with a trainable LoRA adapter; returns (pipe, lora_params)."""
    pipe = load_pipeline(
        config.model.pretrained, dtype=config.model.dtype, device=config.model.device, revision=config.model.revision
    )
    # Seeded so every process (rollouts, each learner rank, a resumed run) builds the same adapter.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.run.seed)
        params = add_lora(denoiser(pipe), config.lora.rank, config.lora.alpha, config.lora.target_modules)
    if config.lora.init_from:
        load_lora_state_dict(denoiser(pipe), read_lora_file(config.lora.init_from))
    if config.model.compile:
        compile_denoiser(pipe, config.model.device)
    return pipe, params


def denoiser(pipe) -> torch.nn.Module:
    """The network that is fine-tuned: the UNet (SD 1.x/2.x) or the transformer (SD3)."""
    model = getattr(pipe, "unet", None)
    return model if model is not None else pipe.transformer


def compile_denoiser(pipe, device: str) -> None:
    """torch.compile the denoiser in place (nn.Module.compile): the module, its LoRA layers and any
    DDP wrapper around it stay what they are, only its forward runs compiled. The first batch of
    each shape pays the compilation."""
    from dense_rl.config.preflight import compile_problem

    problem = compile_problem(device)
    if problem:
        raise RuntimeError(problem)
    denoiser(pipe).compile()


def is_flow(pipe) -> bool:
    """True for rectified-flow (flow-matching) pipelines: the model predicts a velocity."""
    return isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)


def latent_shape(pipe, resolution: int | None = None) -> tuple[int, int, int]:
    """(channels, height, width) of the diffused sample: latents with a VAE, pixels without; at the
    model's own size, or for `resolution` x `resolution` images."""
    config = denoiser(pipe).config
    if resolution is None:
        size = config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return config.in_channels, height, width
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1) if pipe.vae is not None else 1
    multiple = scale * getattr(config, "patch_size", 1)
    if resolution % multiple:
        raise ValueError(f"sample.resolution: {resolution} is not a multiple of {multiple} (the VAE's downscaling "
                         f"x the transformer's patch size); pick e.g. {resolution // multiple * multiple or multiple}")
    return config.in_channels, resolution // scale, resolution // scale


def t5_sequence_length(pipe) -> int:
    """How many T5 tokens SD3 prompts get: diffusers' default (256) with a T5; 0 without one.

    Without a T5 diffusers fills its slots with zeros; zeros carry no prompt, and none at all keeps the
    sequence at the CLIP tokenizer's length (what the embedded tiny flow model is trained with). Note
    that diffusers' own `__call__` pads 256 zero tokens unless given `max_sequence_length=0`."""
    return T5_MAX_SEQUENCE_LENGTH if getattr(pipe, "text_encoder_3", None) is not None else 0


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], *, max_sequence_length: int | None = None) -> PromptEmbeds:
    """The denoiser's text conditioning for `prompts` (no classifier-free guidance: encode the negative
    prompt with another call).

    SD 1.x/2.x: the text encoder's last hidden state [B, 77, D], pooled None. SD3: exactly
    `StableDiffusion3Pipeline.encode_prompt` (CLIP penultimate states of both encoders side by side,
    padded to the T5 width, then `max_sequence_length` T5 tokens; pooled = both CLIP projections),
    with `max_sequence_length` defaulting to `t5_sequence_length(pipe)`."""
    prompts = list(prompts)
    if getattr(pipe, "transformer", None) is not None:
        length = t5_sequence_length(pipe) if max_sequence_length is None else max_sequence_length
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=pipe.text_encoder.device,
            do_classifier_free_guidance=False, max_sequence_length=length,
        )
        return PromptEmbeds(embeds, pooled)
    tokens = pipe.tokenizer(
        prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
        truncation=True, return_tensors="pt",
    )
    return PromptEmbeds(pipe.text_encoder(tokens.input_ids.to(pipe.text_encoder.device))[0])


@torch.no_grad()
def decode_to_images(pipe, samples: torch.Tensor) -> torch.Tensor:
    """Final diffusion samples -> float32 RGB images [B, 3, H, W] in [0, 1].

    With a VAE: latents / scaling_factor (+ shift_factor, SD3's VAE) decoded; without one the sample
    is the image in [-1, 1]."""
    if pipe.vae is not None:
        config = pipe.vae.config
        latents = samples.to(pipe.vae.dtype) / config.scaling_factor
        if getattr(config, "shift_factor", None) is not None:
            latents = latents + config.shift_factor
        samples = pipe.vae.decode(latents).sample
    return ((samples.float().clamp(-1, 1) + 1) / 2).cpu()
