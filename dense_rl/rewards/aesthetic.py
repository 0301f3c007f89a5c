"""LAION aesthetic predictor ("aesthetic"), as DDPO uses it.

score = MLP(normalise(CLIP ViT-L/14 image embedding)): the "improved aesthetic predictor" head
(sac+logos+ava1-l14-linearMSE, a stack of linear layers with no activations), about 5-6 for typical
SD 1.5 images on its 1-10 scale. Prompts are ignored.

`path`:
- None: CLIP from `openai/clip-vit-large-patch14`, head `aesthetic-model.pth` from
  `trl-lib/ddpo-aesthetic-predictor` (the copy TRL's DDPO example downloads).
- a hub id: the head file from that repo, CLIP from `openai/clip-vit-large-patch14`.
- a local folder: a `transformers.CLIPModel` (config.json + weights, preprocessor_config.json
  optional) and the head as `aesthetic-model.safetensors` or `aesthetic-model.pth` beside it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dense_rl.rewards.clip_common import (
    image_embeddings,
    local_or_hub_file,
    normalize,
    read_image_geometry,
    resize_shortest_side_and_center_crop,
    resolve_dtype,
)

AESTHETIC_CLIP = "openai/clip-vit-large-patch14"
AESTHETIC_HEAD_REPO = "trl-lib/ddpo-aesthetic-predictor"
AESTHETIC_HEAD_FILE = "aesthetic-model.pth"


class AestheticHead(nn.Module):
    """The predictor's layer stack. The dropouts keep the checkpoint's key indices (layers.0/2/4/6/7)."""

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)


def load_head_state(file: str) -> dict[str, torch.Tensor]:
    if file.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(file)
    # A .pth head is a plain state dict; weights_only refuses anything but tensors.
    return torch.load(file, map_location="cpu", weights_only=True)


class AestheticReward:
    name = "aesthetic"

    def __init__(self, path: str | None = None, device: str | torch.device = "cpu", dtype: str = "auto"):
        from transformers import CLIPModel

        self.path = path
        self.device = torch.device(device)
        self.dtype = resolve_dtype(self.device, dtype)
        local = path is not None and Path(path).is_dir()
        clip_source = path if local else AESTHETIC_CLIP
        if local and (Path(path) / "aesthetic-model.safetensors").is_file():
            head_file = str(Path(path) / "aesthetic-model.safetensors")
        else:
            head_file = local_or_hub_file(path or AESTHETIC_HEAD_REPO, AESTHETIC_HEAD_FILE)
        self.model = CLIPModel.from_pretrained(clip_source, dtype=self.dtype).to(self.device).eval().requires_grad_(False)
        self.geometry = read_image_geometry(clip_source)
        state = load_head_state(head_file)
        self.head = AestheticHead(embed_dim=state["layers.0.weight"].shape[1])
        self.head.load_state_dict(state)
        # The head is tiny: keep it in float32 so half precision touches only the CLIP tower.
        self.head.to(self.device).eval().requires_grad_(False)

    def __repr__(self) -> str:
        return f"AestheticReward(path={self.path!r}, device={str(self.device)!r}, dtype={self.dtype})"

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        x = images.detach().to(self.device, torch.float32)
        x = resize_shortest_side_and_center_crop(x, g["size"], g["crop"])
        return normalize(x, g["mean"], g["std"]).to(self.dtype)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        images = torch.as_tensor(images)
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B,3,H,W] in [0,1], got shape {tuple(images.shape)}")
        embeddings = image_embeddings(self.model, self.pixel_values(images))
        return self.head(embeddings).float().cpu()
