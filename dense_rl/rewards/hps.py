"""Human Preference Score v2 / v2.1 ("hps" = v2.1, "hps_v2.0" = v2.0).

HPS checkpoints (`xswu/HPSv2`: `HPS_v2_compressed.pt`, `HPS_v2.1_compressed.pt`) are OpenCLIP
ViT-H-14 state dicts. We load them into `transformers.CLIPModel` through a key mapping rather than
depending on the `hpsv2` package (its pins break ray[default], its wheel lacks its tokenizer
vocabulary, and it reloads the checkpoint on every call). Scoring reproduces HPS exactly:

- image: bicubic resize of the longest side to 224, zero padding to a square, OpenAI mean/std;
- text: CLIP BPE, <start> tokens <end>, truncated to 77 with <end> kept last, padded with id 0;
- score: cosine similarity of the two embeddings (no logit scale), about 0.25-0.30 on SD 1.5.

`path`:
- None or a hub id: the checkpoint from that repo (default `xswu/HPSv2`), ViT-H-14 architecture,
  tokenizer from `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`;
- a local .pt/.safetensors file: that checkpoint, same architecture and tokenizer;
- a local folder: the checkpoint by its usual file name, plus `open_clip_config.json` (OpenCLIP's
  {"model_cfg": ...} layout, for another architecture) and tokenizer files when present.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dense_rl.rewards.clip_common import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    check_images,
    clip_embeddings,
    has_tokenizer_files,
    local_or_hub_file,
    normalize,
    resize_longest_side_and_pad,
    resolve_dtype,
)

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
HPS_TOKENIZER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
PAD_ID = 0  # OpenCLIP pads with zeros, not with <end>

# OpenCLIP's ViT-H-14 model config (open_clip/model_configs/ViT-H-14.json).
VIT_H_14 = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}


def clip_config_from_open_clip(model_cfg: dict):
    """The `transformers.CLIPConfig` of an OpenCLIP model config (standard ViT + text transformer)."""
    from transformers import CLIPConfig

    vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    if model_cfg.get("quick_gelu") or "timm_model_name" in vision or "hf_model_name" in text:
        raise ValueError("only OpenCLIP ViT towers with GELU and the built-in text transformer are supported")
    act = "gelu"  # OpenCLIP's nn.GELU is the exact (erf) GELU, as is transformers' "gelu"
    vision_config = {
        "hidden_size": vision["width"], "num_hidden_layers": vision["layers"],
        "num_attention_heads": vision["width"] // vision.get("head_width", 64),
        "intermediate_size": int(vision["width"] * vision.get("mlp_ratio", 4.0)),
        "image_size": vision["image_size"], "patch_size": vision["patch_size"],
        "projection_dim": model_cfg["embed_dim"], "hidden_act": act, "layer_norm_eps": 1e-5,
    }
    text_config = {
        "hidden_size": text["width"], "num_hidden_layers": text["layers"], "num_attention_heads": text["heads"],
        "intermediate_size": int(text["width"] * text.get("mlp_ratio", 4.0)),
        "vocab_size": text["vocab_size"], "max_position_embeddings": text["context_length"],
        "projection_dim": model_cfg["embed_dim"], "hidden_act": act, "layer_norm_eps": 1e-5,
        # <start> and <end> are the last two ids of the CLIP BPE vocabulary; pooling reads <end>.
        "bos_token_id": text["vocab_size"] - 2, "eos_token_id": text["vocab_size"] - 1, "pad_token_id": PAD_ID,
    }
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=model_cfg["embed_dim"])


def _map_block(source: dict, src: str, dst: str, out: dict) -> None:
    """One OpenCLIP residual block into a transformers CLIPEncoderLayer."""
    q, k, v = source[f"{src}.attn.in_proj_weight"].chunk(3, dim=0)  # fused q/k/v, stacked on dim 0
    qb, kb, vb = source[f"{src}.attn.in_proj_bias"].chunk(3, dim=0)
    out.update({
        f"{dst}.self_attn.q_proj.weight": q, f"{dst}.self_attn.q_proj.bias": qb,
        f"{dst}.self_attn.k_proj.weight": k, f"{dst}.self_attn.k_proj.bias": kb,
        f"{dst}.self_attn.v_proj.weight": v, f"{dst}.self_attn.v_proj.bias": vb,
        f"{dst}.self_attn.out_proj.weight": source[f"{src}.attn.out_proj.weight"],
        f"{dst}.self_attn.out_proj.bias": source[f"{src}.attn.out_proj.bias"],
        f"{dst}.layer_norm1.weight": source[f"{src}.ln_1.weight"], f"{dst}.layer_norm1.bias": source[f"{src}.ln_1.bias"],
        f"{dst}.layer_norm2.weight": source[f"{src}.ln_2.weight"], f"{dst}.layer_norm2.bias": source[f"{src}.ln_2.bias"],
        f"{dst}.mlp.fc1.weight": source[f"{src}.mlp.c_fc.weight"], f"{dst}.mlp.fc1.bias": source[f"{src}.mlp.c_fc.bias"],
        f"{dst}.mlp.fc2.weight": source[f"{src}.mlp.c_proj.weight"], f"{dst}.mlp.fc2.bias": source[f"{src}.mlp.c_proj.bias"],
    })


def open_clip_to_transformers(state: dict[str, torch.Tensor], model_cfg: dict) -> dict[str, torch.Tensor]:
    """Rename an OpenCLIP CLIP state dict into `transformers.CLIPModel` keys. OpenCLIP applies its
    projections as `x @ proj` ([in, out]); nn.Linear stores [out, in], hence the transposes."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    out = {
        "logit_scale": state["logit_scale"],
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": state["visual.ln_post.bias"],
        "visual_projection.weight": state["visual.proj"].t().contiguous(),
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": state["ln_final.bias"],
        "text_projection.weight": state["text_projection"].t().contiguous(),
    }
    for i in range(model_cfg["vision_cfg"]["layers"]):
        _map_block(state, f"visual.transformer.resblocks.{i}", f"vision_model.encoder.layers.{i}", out)
    for i in range(model_cfg["text_cfg"]["layers"]):
        _map_block(state, f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}", out)
    return out


def load_open_clip_state(file: str) -> dict[str, torch.Tensor]:
    if file.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(file)
    # HPS's .pt holds {"state_dict": {...}} of plain tensors; weights_only refuses anything else.
    checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    return checkpoint.get("state_dict", checkpoint)


def hps_token_ids(tokenizer, prompts: list[str], context_length: int) -> torch.Tensor:
    """HPS/OpenCLIP tokenisation: <start> tokens <end>, cut to `context_length` with <end> last, 0-padded."""
    ids = torch.full((len(prompts), context_length), PAD_ID, dtype=torch.long)
    for row, tokens in enumerate(tokenizer(list(prompts), add_special_tokens=True).input_ids):
        if len(tokens) > context_length:
            tokens = tokens[:context_length]
            tokens[-1] = tokenizer.eos_token_id
        ids[row, : len(tokens)] = torch.tensor(tokens)
    return ids


class HPSReward:
    name = "hps"
    version = "v2.1"

    def __init__(self, path: str | None = None, device: str | torch.device = "cpu", dtype: str = "auto"):
        from transformers import AutoTokenizer, CLIPModel

        self.path = path or HPS_REPO
        self.device = torch.device(device)
        self.dtype = resolve_dtype(self.device, dtype)
        folder = Path(self.path) if Path(self.path).is_dir() else None
        model_cfg = VIT_H_14
        if folder is not None and (folder / "open_clip_config.json").is_file():
            model_cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder) if folder and has_tokenizer_files(folder) else HPS_TOKENIZER)
        self.checkpoint = local_or_hub_file(self.path, HPS_FILES[self.version])

        state = open_clip_to_transformers(load_open_clip_state(self.checkpoint), model_cfg)
        with torch.device(self.device):  # initialise where it will run: fast on a GPU
            model = CLIPModel(clip_config_from_open_clip(model_cfg))
        model.load_state_dict(state, strict=True)  # every weight accounted for, none left random
        self.model = model.to(self.device, self.dtype).eval().requires_grad_(False)
        self.image_size = model_cfg["vision_cfg"]["image_size"]
        self.context_length = model_cfg["text_cfg"]["context_length"]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(checkpoint={self.checkpoint!r}, device={str(self.device)!r}, dtype={self.dtype})"

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().to(self.device, torch.float32)
        x = resize_longest_side_and_pad(x, self.image_size)
        return normalize(x, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD).to(self.dtype)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        images = check_images(images, prompts)
        input_ids = hps_token_ids(self.tokenizer, prompts, self.context_length).to(self.device)
        image_embeds, text_embeds = clip_embeddings(self.model, self.pixel_values(images), input_ids)
        return (image_embeds * text_embeds).sum(-1).float().cpu()


class HPSv20Reward(HPSReward):
    name = "hps_v2.0"
    version = "v2.0"
