"""PickScore ("pickscore"): a CLIP ViT-H/14 fine-tuned on Pick-a-Pic human preferences.

score = logit_scale.exp() * <normalised image embedding, normalised text embedding>, as in the
PickScore reference code (about 20-23 for good SD 1.5 images).

`path` is a hub id or a local folder holding a `transformers.CLIPModel` (config.json + weights). The
tokenizer and image geometry come from the same folder when it has them (preprocessor_config.json,
tokenizer files), else from the LAION ViT-H/14 processor PickScore was trained with.
"""

from __future__ import annotations

import torch

from dense_rl.rewards.clip_common import (
    check_images,
    clip_embeddings,
    has_tokenizer_files,
    normalize,
    read_image_geometry,
    resize_shortest_side_and_center_crop,
    resolve_dtype,
)

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class PickScore:
    name = "pickscore"

    def __init__(self, path: str | None = None, device: str | torch.device = "cpu", dtype: str = "auto"):
        from transformers import AutoTokenizer, CLIPModel

        self.path = path or PICKSCORE_MODEL
        self.device = torch.device(device)
        self.dtype = resolve_dtype(self.device, dtype)
        processor_source = self.path if has_tokenizer_files(self.path) else PICKSCORE_PROCESSOR
        self.tokenizer = AutoTokenizer.from_pretrained(processor_source)
        self.geometry = read_image_geometry(processor_source)
        self.model = CLIPModel.from_pretrained(self.path, dtype=self.dtype).to(self.device).eval().requires_grad_(False)
        self.max_length = self.model.config.text_config.max_position_embeddings

    def __repr__(self) -> str:
        return f"PickScore(path={self.path!r}, device={str(self.device)!r}, dtype={self.dtype})"

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        x = images.detach().to(self.device, torch.float32)
        x = resize_shortest_side_and_center_crop(x, g["size"], g["crop"])
        return normalize(x, g["mean"], g["std"]).to(self.dtype)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        images = check_images(images, prompts)
        text = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        image_embeds, text_embeds = clip_embeddings(
            self.model, self.pixel_values(images), text.input_ids.to(self.device), text.attention_mask.to(self.device)
        )
        scores = self.model.logit_scale.float().exp() * (image_embeds * text_embeds).sum(-1)
        return scores.float().cpu()
