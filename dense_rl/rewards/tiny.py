"""The embedded tiny world's reward models (trained by ``python -m dense_rl.models.tiny.train.rewards``).

- :class:`DigitAlignmentReward` ("digit_alignment"): prompt alignment, P(prompted digit) x
  P(prompted colour) from a small two-headed CNN classifier.
- :class:`PreferenceReward` ("preference"): a small Bradley-Terry CNN scorer, the tiny analogue of
  a human-preference model such as HPSv2 (bold, centred, crisp, high-contrast digits score higher).

Both take images float [B,3,H,W] in [0,1] (resized to 16x16 if needed) and return float32 [B] on CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from dense_rl import ASSETS
from dense_rl.models.tiny.data import COLOR_NAMES, parse_prompt
from dense_rl.models.tiny.nets import load_net

DEFAULT_CLASSIFIER = ASSETS / "rewards" / "digit_classifier.safetensors"
DEFAULT_PREFERENCE = ASSETS / "rewards" / "preference.safetensors"
IMAGE_SIZE = 16


def _prepare(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    images = torch.as_tensor(images)
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B,3,H,W], got shape {tuple(images.shape)}")
    x = images.detach().to(device=device, dtype=torch.float32)
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(0.0, 1.0)


class _TinyReward:
    default_path: Path
    arch: str

    def __init__(self, path: str | Path | None = None, device: str | torch.device = "cpu"):
        self.path = Path(path) if path is not None else self.default_path
        self.device = torch.device(device)
        self.model = load_net(self.path, map_location=self.device)
        if type(self.model).__name__ != self.arch:
            raise ValueError(f"{self.path} holds a {type(self.model).__name__}, expected a {self.arch}")
        self.model.eval().requires_grad_(False)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={str(self.path)!r}, device={str(self.device)!r})"


class DigitAlignmentReward(_TinyReward):
    """P(prompted digit) * P(prompted colour) under the shipped digit/colour classifier."""

    name = "digit_alignment"
    default_path = DEFAULT_CLASSIFIER
    arch = "DigitColorNet"

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(digit_probs [B,10], color_probs [B,6]) as float32 on CPU; colours ordered as COLOR_NAMES."""
        self.model.eval()
        digit_logits, color_logits = self.model(_prepare(images, self.device))
        return digit_logits.softmax(-1).float().cpu(), color_logits.softmax(-1).float().cpu()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if len(prompts) != len(images):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        targets = [parse_prompt(p) for p in prompts]
        digit_probs, color_probs = self.predict(images)
        d = torch.tensor([t[0] for t in targets])
        c = torch.tensor([COLOR_NAMES.index(t[1]) for t in targets])
        rows = torch.arange(len(targets))
        return (digit_probs[rows, d] * color_probs[rows, c]).float()


class PreferenceReward(_TinyReward):
    """Scalar preference score (Bradley-Terry logit scale; higher is better). Prompts are ignored."""

    name = "preference"
    default_path = DEFAULT_PREFERENCE
    arch = "PreferenceNet"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        self.model.eval()
        return self.model(_prepare(images, self.device)).float().cpu()
