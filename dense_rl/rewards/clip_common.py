"""What the CLIP-based rewards (aesthetic, HPS, PickScore) share: finding weights, picking a dtype,
tensor preprocessing, and the CLIP embedding pair.

Preprocessing works on the batch tensor the sampler returns (float [B,3,H,W] in [0,1]) on the
reward's device; there is no PIL round trip per image.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

# The mean/std every OpenAI / OpenCLIP ViT was trained with.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(device: str | torch.device, dtype: str = "auto") -> torch.dtype:
    """"auto" is float16 on CUDA (the weights are large, the score tolerates it) and float32 on CPU."""
    if dtype == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not auto, float32, float16 or bfloat16")
    return DTYPES[dtype]


def local_or_hub_file(path_or_repo: str, filename: str, revision: str | None = None) -> str:
    """A local file, `filename` inside a local folder, or `filename` downloaded from a hub repo."""
    local = Path(path_or_repo).expanduser()
    if local.is_file():
        return str(local)
    if local.is_dir():
        if not (local / filename).is_file():
            raise FileNotFoundError(f"{local} has no {filename}; put the file there or pass its path")
        return str(local / filename)
    from huggingface_hub import hf_hub_download

    return hf_hub_download(path_or_repo, filename, revision=revision)


def has_tokenizer_files(folder: str | Path) -> bool:
    folder = Path(folder)
    return folder.is_dir() and ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file())


def read_image_geometry(source: str) -> dict:
    """shortest-edge size, crop size, mean and std from a preprocessor_config.json (local or hub)."""
    local = Path(source) / "preprocessor_config.json"
    if local.is_file():
        config_file = str(local)
    elif Path(source).is_dir():
        config_file = None
    else:
        from huggingface_hub import hf_hub_download

        config_file = hf_hub_download(source, "preprocessor_config.json")
    config = json.loads(Path(config_file).read_text()) if config_file else {}
    size = config.get("size", 224)
    size = size.get("shortest_edge", size.get("height", 224)) if isinstance(size, dict) else size
    crop = config.get("crop_size", size)
    crop = crop.get("height", size) if isinstance(crop, dict) else crop
    return {
        "size": int(size), "crop": int(crop),
        "mean": tuple(config.get("image_mean", OPENAI_CLIP_MEAN)), "std": tuple(config.get("image_std", OPENAI_CLIP_STD)),
    }


def check_images(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    images = torch.as_tensor(images)
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B,3,H,W] in [0,1], got shape {tuple(images.shape)}")
    if len(prompts) != len(images):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
    return images


def resize_shortest_side_and_center_crop(images: torch.Tensor, size: int, crop: int) -> torch.Tensor:
    """CLIPImageProcessor's geometry: bicubic resize so the short side is `size`, then a centre crop."""
    height, width = images.shape[-2:]
    short, long = min(height, width), max(height, width)
    new_short, new_long = size, int(size * long / short)
    new_size = (new_short, new_long) if height <= width else (new_long, new_short)
    if new_size != (height, width):
        images = F.interpolate(images, size=new_size, mode="bicubic", align_corners=False, antialias=True)
    top = int(round((new_size[0] - crop) / 2.0))
    left = int(round((new_size[1] - crop) / 2.0))
    return images[..., top: top + crop, left: left + crop]


def resize_longest_side_and_pad(images: torch.Tensor, size: int) -> torch.Tensor:
    """HPS's geometry (OpenCLIP's ResizeMaxSize): bicubic resize so the long side is `size`, then pad
    with zeros (black, before normalisation) to a square; an image already `size` long is untouched."""
    height, width = images.shape[-2:]
    scale = size / float(max(height, width))
    if scale == 1.0:
        return images
    new_height, new_width = round(height * scale), round(width * scale)
    images = F.interpolate(images, size=(new_height, new_width), mode="bicubic", align_corners=False, antialias=True)
    pad_h, pad_w = size - new_height, size - new_width
    return F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean) / std


def clip_embeddings(model, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised (image, text) embeddings of a `transformers.CLIPModel`, in float32.

    Written out (tower -> pooled output -> projection) rather than through get_*_features, whose
    return type changed across transformers versions.
    """
    image = model.visual_projection(model.vision_model(pixel_values=pixel_values).pooler_output)
    text = model.text_projection(model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output)
    return F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)


def image_embeddings(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """L2-normalised image embeddings of a `transformers.CLIPModel`, in float32."""
    image = model.visual_projection(model.vision_model(pixel_values=pixel_values).pooler_output)
    return F.normalize(image.float(), dim=-1)
