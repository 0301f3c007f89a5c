"""ImageReward (Xu et al. 2023, hub id `THUDM/ImageReward`) on transformers' BLIP classes.

The `image-reward` package cannot be a dependency: it pins timm==0.6.13, needs fairscale and
torchvision, and its BLIP text encoder (med.py) imports `find_pruneable_heads_and_indices` from
`transformers.modeling_utils`, which transformers 5 no longer has. The model is small enough to
rebuild from transformers' own parts:

    image [B,3,224,224] ─► BLIP ViT (BlipVisionModel) ─► image tokens [B, 1+N, Dv]
    prompt ─► BERT tokenizer (35 tokens) ─► BERT with cross-attention to the image tokens (BlipTextModel)
    hidden state of [CLS] [B, Dt] ─► MLP head (5 linear layers, no activations) ─► (r - mean) / std

`ImageReward.pt` is a plain state dict in the original's naming (`blip.visual_encoder.*` timm-style
ViT, `blip.text_encoder.*` BLIP's BERT, `mlp.layers.*`); `convert_imagereward_state_dict` maps it
onto the transformers modules. Where the two could differ, the original wins: the ViT's LayerNorm
eps is 1e-6 (timm's BLIP ViT), not transformers' BLIP default 1e-5. Differences that remain are in
docs/rewards.md.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_HUB_ID = "THUDM/ImageReward"
CHECKPOINT_NAMES = ("ImageReward.pt", "ImageReward.safetensors")
MED_CONFIG_NAME = "med_config.json"
# The hub repository has no tokenizer; ImageReward uses bert-base-uncased plus two BLIP tokens.
DEFAULT_TOKENIZER = "google-bert/bert-base-uncased"
MAX_TEXT_LENGTH = 35
IMAGE_SIZE = 224
# CLIP's mean/std, which ImageReward's preprocessing uses.
PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)
# The reward normalisation ImageReward applies to the head's output (its ImageReward.py).
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
# BLIP's med_config.json (BERT-base with cross-attention), used when a checkpoint comes without one.
DEFAULT_MED_CONFIG = {
    "vocab_size": 30524, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "hidden_act": "gelu", "layer_norm_eps": 1e-12, "max_position_embeddings": 512,
    "pad_token_id": 0,
}
VIT_HEAD_DIM = 64  # every BLIP ViT (base: 768/12, large: 1024/16); the checkpoint does not store head counts
VIT_LAYER_NORM_EPS = 1e-6
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------- finding the files


def resolve_imagereward_files(path: str | None) -> tuple[Path, Path | None, str]:
    """(checkpoint, med_config or None, tokenizer source) for a hub id, a folder or a checkpoint file.

    A folder (or the folder of a file) may hold `med_config.json` and a BERT tokenizer (vocab.txt or
    tokenizer.json); without them the BLIP defaults and bert-base-uncased are used.
    """
    spec = path or DEFAULT_HUB_ID
    local = Path(spec).expanduser()
    if local.is_file():
        folder, checkpoint = local.parent, local
    elif local.is_dir():
        folder = local
        found = [local / name for name in CHECKPOINT_NAMES if (local / name).is_file()]
        if not found:
            raise FileNotFoundError(
                f"rewards[].path: {local} holds neither {' nor '.join(CHECKPOINT_NAMES)}; "
                f"point it at ImageReward's checkpoint folder or use the hub id {DEFAULT_HUB_ID}"
            )
        checkpoint = found[0]
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not spec.startswith((".", "/")):
        from huggingface_hub import hf_hub_download

        checkpoint = Path(hf_hub_download(spec, CHECKPOINT_NAMES[0]))
        med_config = Path(hf_hub_download(spec, MED_CONFIG_NAME))
        return checkpoint, med_config, DEFAULT_TOKENIZER
    else:
        raise FileNotFoundError(f"rewards[].path: {spec!r} is neither a file, a folder nor a hub id like {DEFAULT_HUB_ID}")
    med_config = folder / MED_CONFIG_NAME
    has_tokenizer = (folder / "vocab.txt").is_file() or (folder / "tokenizer.json").is_file()
    return checkpoint, (med_config if med_config.is_file() else None), (str(folder) if has_tokenizer else DEFAULT_TOKENIZER)


def read_checkpoint(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The original's state dict. `.pt` files are read with weights_only=True: tensors, never code."""
    if checkpoint.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(checkpoint))
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"rewards[].path: {checkpoint} is not a state dict of tensors (ImageReward.pt is one)")
    return state


# ---------------------------------------------------------------------------- the model


def _head(text_width: int = 768) -> nn.Sequential:
    # The original's MLP: 768 -> 1024 -> 128 -> 64 -> 16 -> 1 with dropouts between and its ReLUs
    # commented out; kept index for index so the checkpoint's `mlp.layers.N` names load unchanged.
    return nn.Sequential(
        nn.Linear(text_width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
        nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
    )


def build_configs(state: dict[str, torch.Tensor], med_config: dict):
    """BlipVisionConfig and BlipTextConfig for the checkpoint's shapes and the text config file."""
    from transformers import BlipTextConfig, BlipVisionConfig

    patch = state["blip.visual_encoder.patch_embed.proj.weight"]
    width, patch_size = patch.shape[0], patch.shape[-1]
    num_patches = state["blip.visual_encoder.pos_embed"].shape[1] - 1
    depth = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("blip.visual_encoder.blocks."))
    vision = BlipVisionConfig(
        hidden_size=width, intermediate_size=state["blip.visual_encoder.blocks.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=depth, num_attention_heads=max(1, width // VIT_HEAD_DIM),
        image_size=round(num_patches ** 0.5) * patch_size, patch_size=patch_size,
        hidden_act="gelu", layer_norm_eps=VIT_LAYER_NORM_EPS,
    )
    med = {**DEFAULT_MED_CONFIG, **med_config}
    text = BlipTextConfig(
        vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], encoder_hidden_size=width,
        intermediate_size=med["intermediate_size"], num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"], max_position_embeddings=med["max_position_embeddings"],
        hidden_act=med["hidden_act"], layer_norm_eps=med["layer_norm_eps"], pad_token_id=med["pad_token_id"],
        is_decoder=True,  # builds the cross-attention layers; forward() runs bidirectionally
    )
    return vision, text


# Original (timm ViT) names -> transformers BlipVisionModel names, after "blip.visual_encoder.".
_VISION_RENAMES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]
# Parts of the BLIP checkpoint ImageReward does not use for scoring.
_UNUSED = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")


def convert_imagereward_state_dict(state: dict[str, torch.Tensor]):
    """Split the original's state dict into (vision, text, head) state dicts in transformers' naming.

    BLIP's BERT (med.py) is what transformers' BlipTextModel was ported from, so its names carry over.
    """
    vision, text, head = {}, {}, {}
    for key, value in state.items():
        if key.startswith(_UNUSED):
            continue
        if key.startswith("blip.visual_encoder."):
            name = key[len("blip.visual_encoder."):]
            for pattern, replacement in _VISION_RENAMES:
                name, count = re.subn(pattern, replacement, name)
                if count:
                    break
            else:
                raise ValueError(f"unexpected ImageReward vision key {key!r}")
            vision[name] = value
        elif key.startswith("blip.text_encoder."):
            text[key[len("blip.text_encoder."):]] = value
        elif key.startswith("mlp.layers."):
            head[key[len("mlp.layers."):]] = value
        else:
            raise ValueError(f"unexpected ImageReward key {key!r}; is this an ImageReward checkpoint?")
    return vision, text, head


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise ValueError(f"ImageReward {what}: {len(missing)} missing keys (e.g. {missing[:2]}) and "
                         f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:2]})")


# ---------------------------------------------------------------------------- preprocessing


def preprocess(images: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """[B,3,H,W] in [0,1] -> normalised [B,3,size,size], as ImageReward's PIL transform on tensors:
    quantise to 8 bits (it scores PIL images), bicubic resize of the shorter side to `size`
    (torchvision's rounding of the longer side), centre crop, CLIP mean/std."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B,3,H,W] in [0,1], got shape {tuple(images.shape)}")
    x = (images.float().clamp(0, 1) * 255).round() / 255
    height, width = x.shape[-2:]
    if height <= width:
        new_h, new_w = size, int(size * width / height)
    else:
        new_h, new_w = int(size * height / width), size
    if (new_h, new_w) != (height, width):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    x = x[..., top : top + size, left : left + size]
    mean = torch.tensor(PIXEL_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


# ---------------------------------------------------------------------------- the reward


class ImageRewardScorer:
    """`scorer(images [B,3,H,W] in [0,1], prompts) -> float32 [B]`: ImageReward's normalised score."""

    name = "imagereward"

    def __init__(self, path: str | None = None, device: str | torch.device = "cpu", dtype: str = "auto",
                 batch_size: int = 32):
        from transformers import BertTokenizer, BlipTextModel, BlipVisionModel

        self.device = torch.device(device)
        # The two encoders run in `dtype` ("auto": float16 on GPU, float32 on CPU); the small head
        # always runs in float32, as in the original.
        if dtype == "auto":
            dtype = "float16" if self.device.type == "cuda" else "float32"
        if dtype not in _DTYPES:
            raise ValueError(f"rewards[].dtype: {dtype!r} is not auto, float32, float16 or bfloat16")
        self.dtype = _DTYPES[dtype]
        self.batch_size = batch_size
        checkpoint, med_config_file, tokenizer_source = resolve_imagereward_files(path)
        self.source = str(checkpoint)
        state = read_checkpoint(checkpoint)
        med_config = json.loads(med_config_file.read_text()) if med_config_file is not None else {}
        vision_config, text_config = build_configs(state, med_config)
        vision_state, text_state, head_state = convert_imagereward_state_dict(state)

        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.head = _head(text_config.hidden_size)
        _load_strict(self.vision, vision_state, "vision encoder")
        _load_strict(self.text, text_state, "text encoder")
        _load_strict(self.head, head_state, "MLP head")
        self.vision.to(self.device, self.dtype).eval().requires_grad_(False)
        self.text.to(self.device, self.dtype).eval().requires_grad_(False)
        self.head.to(self.device, torch.float32).eval().requires_grad_(False)
        self.image_size = vision_config.image_size

        self.tokenizer = BertTokenizer.from_pretrained(tokenizer_source)
        # BLIP's tokenizer adds these two; plain prompts tokenise the same with or without them.
        self.tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})

    def __repr__(self) -> str:
        return f"ImageRewardScorer(path={self.source!r}, device={str(self.device)!r})"

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_TEXT_LENGTH,
                                return_tensors="pt")
        return tokens.input_ids, tokens.attention_mask

    @torch.no_grad()
    def score_pixels(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Scores of already-preprocessed images [B,3,S,S] with tokenised prompts; float32 [B] on CPU."""
        image_tokens = self.vision(pixel_values.to(self.device, self.dtype)).last_hidden_state
        text_out = self.text(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
            encoder_hidden_states=image_tokens,
            encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long, device=self.device),
        )
        raw = self.head(text_out.last_hidden_state[:, 0, :].float()).squeeze(-1)
        return ((raw - REWARD_MEAN) / REWARD_STD).float().cpu()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        images = torch.as_tensor(images)
        if len(prompts) != len(images):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        scores = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size].to(self.device)
            input_ids, attention_mask = self.tokenize(prompts[start : start + self.batch_size])
            scores.append(self.score_pixels(preprocess(chunk, self.image_size), input_ids, attention_mask))
        return torch.cat(scores)
