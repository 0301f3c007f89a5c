"""LoRA on the denoiser through peft: add it, move its state around as tensors, export it for diffusers.

The denoiser is the UNet (SD 1.x/2.x) or the transformer (SD3); every function takes either. The
adapter state travels between roles as a flat `{name: tensor}` dict in peft's naming; files on disk
use diffusers' naming, so the pipeline's own `load_lora_weights(folder)` loads them: UNet weights as
`StableDiffusionPipeline.save_lora_weights` writes them ("unet." + diffusers' lora names), transformer
weights as `StableDiffusion3Pipeline.save_lora_weights` does ("transformer." + peft names). A file
also carries the adapter's LoraConfig (rank, alpha, target modules) as diffusers' adapter metadata:
without it diffusers assumes alpha = rank, and a LoRA trained with another alpha loads at the wrong
scale.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft import LoraConfig as PeftLoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for
COMPONENTS = ("unet", "transformer")  # the pipeline component a LoRA file's keys are prefixed with


def lora_component(model) -> str:
    """The pipeline component name of a denoiser: "unet" for a UNet, "transformer" otherwise (SD3)."""
    return "unet" if isinstance(model, UNet2DConditionModel) else "transformer"


def add_lora(unet, rank: int, alpha: float, target_modules: list[str]) -> list[torch.nn.Parameter]:
    """Attach a fresh adapter (B = 0, so the policy starts as the base model); returns its parameters.

    LoRA parameters are kept in float32 even when the UNet runs in half precision: Adam updates of
    size lr * 1 vanish in fp16.
    """
    config = PeftLoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), init_lora_weights="gaussian")
    try:
        unet.add_adapter(config)
    except ValueError as error:
        raise ValueError(f"lora.target_modules: {error}") from None
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"lora.target_modules {target_modules} matched no layer of the {lora_component(unet)}")
    for p in params:
        p.data = p.data.float()
    return params


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The adapter's weights, detached on CPU (peft names, adapter name stripped)."""
    return {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(unet).items()}


def load_lora_state_dict(unet, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into the unet's adapter in place; shapes and names must match exactly."""
    expected = get_peft_model_state_dict(unet)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        name = (missing or unexpected)[0]
        raise ValueError(
            f"LoRA state does not match the adapter: {len(missing)} missing and {len(unexpected)} unexpected "
            f"keys (e.g. {name!r}); were lora.rank and lora.target_modules the same when it was saved?"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"LoRA tensor {key!r} has shape {tuple(tensor.shape)}, the adapter expects {tuple(expected[key].shape)}; "
                "was it saved with another lora.rank?"
            )
    result = set_peft_model_state_dict(unet, state)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"peft rejected LoRA keys, e.g. {result.unexpected_keys[0]!r}")


def lora_adapter_metadata(unet) -> dict:
    """The adapter's LoraConfig as diffusers stores it next to the weights (and `load_lora_weights`
    passes to `LoraConfig(**...)`). Only the fields that shape the adapter: a file should load with
    any peft version, and a newer peft's extra fields would make an older one's LoraConfig refuse it."""
    config = unet.peft_config["default"]
    modules = config.target_modules if isinstance(config.target_modules, str) else sorted(config.target_modules)
    return {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": modules}


def save_lora(unet, folder: str | Path) -> Path:
    """Write the adapter as `folder/pytorch_lora_weights.safetensors` in diffusers' format, with its
    LoraConfig as adapter metadata, so diffusers applies it at the trained scale (alpha / rank).
    A UNet's file loads with `StableDiffusionPipeline.load_lora_weights`, a transformer's with
    `StableDiffusion3Pipeline.load_lora_weights`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if lora_component(unet) == "unet":
        layers = convert_state_dict_to_diffusers(lora_state_dict(unet))
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True,
                                                  unet_lora_adapter_metadata=lora_adapter_metadata(unet))
    else:  # diffusers' SD3 LoRA format is peft's names under "transformer." (as its training scripts save)
        StableDiffusion3Pipeline.save_lora_weights(folder, transformer_lora_layers=lora_state_dict(unet),
                                                   safe_serialization=True,
                                                   transformer_lora_adapter_metadata=lora_adapter_metadata(unet))
    return folder / LORA_FILE


def read_lora_file(path: str | Path, component: str | None = None) -> dict[str, torch.Tensor]:
    """A diffusers-format LoRA file (or a folder holding one) -> peft-named state for `load_lora_state_dict`
    (`component`: as in `lora_state_from_diffusers`)."""
    path = Path(path)
    if path.is_dir():
        path = path / LORA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA weights at {path}")
    return lora_state_from_diffusers(load_file(str(path)), source=str(path), component=component)


def lora_state_from_diffusers(state: dict[str, torch.Tensor], source: str,
                              component: str | None = None) -> dict[str, torch.Tensor]:
    """Diffusers-named LoRA tensors (as saved by `save_lora`) -> peft-named adapter state.

    `component` ("unet" or "transformer") says whose weights to take; None: whichever the file holds."""
    if component is not None and component not in COMPONENTS:
        raise ValueError(f"component must be one of {COMPONENTS}, got {component!r}")
    for name in (component,) if component else COMPONENTS:
        prefix = f"{name}."
        picked = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if picked:
            break
    else:
        wanted = " or ".join(f"'{name}.'" for name in ((component,) if component else COMPONENTS))
        raise ValueError(f"{source} holds no {component or 'UNet or transformer'} LoRA weights (keys should start with {wanted})")
    if name == "transformer" and any("lora_A" in k for k in picked):
        return picked  # already peft's names
    return convert_unet_state_dict_to_peft(picked)
