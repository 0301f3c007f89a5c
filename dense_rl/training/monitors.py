"""Image monitors: cheap statistics of a batch of samples that show a reward being gamed before a learned
judge would (washed-out or blacked-out images, flat images, every sample of a prompt alike). No model."""

from __future__ import annotations

import torch

LUMA = torch.tensor([0.299, 0.587, 0.114])  # Rec. 601 luminance
# Images are compared at most this wide: enough to tell samples apart, too coarse for pixel noise to count.
DIVERSITY_SIZE = 16


def monitor_values(images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Per image of uint8 or [0, 1] float images [B, 3, H, W]: brightness (mean luminance), saturation
    (mean (max - min) / max of RGB) and contrast (the std of the luminance), each in [0, 1]; per prompt
    sampled more than once, diversity: the RMS pixel distance between two of its samples (at
    DIVERSITY_SIZE pixels), averaged over its pairs (absent when no prompt has two samples)."""
    pixels = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    luma = (pixels * LUMA.view(1, 3, 1, 1)).sum(1).flatten(1)  # [B, H*W]
    high, low = pixels.max(1).values, pixels.min(1).values
    saturation = torch.where(high > 0, (high - low) / high.clamp_min(1e-8), torch.zeros_like(high))
    values = {"image_brightness": luma.mean(1), "image_saturation": saturation.flatten(1).mean(1),
              "image_contrast": luma.std(1, unbiased=False)}
    diversity = within_prompt_diversity(pixels, prompts)
    if diversity is not None:
        values["image_diversity"] = diversity
    return values


def image_monitors(images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    """The means of monitor_values: what each epoch reports of its samples."""
    return {name: float(value.mean()) for name, value in monitor_values(images, prompts).items()}


def within_prompt_diversity(pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor | None:
    """[groups]: the mean RMS distance between the samples of each prompt that has two or more; None
    when none has."""
    size = min(DIVERSITY_SIZE, pixels.shape[-1])
    small = torch.nn.functional.adaptive_avg_pool2d(pixels, size).flatten(1)
    groups: dict[str, list[int]] = {}
    for row, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(row)
    distances = []
    for rows in groups.values():
        if len(rows) < 2:
            continue
        group = small[rows]
        pairwise = torch.cdist(group, group) / group.shape[1] ** 0.5  # RMS over pixels and channels
        upper = torch.triu_indices(len(rows), len(rows), offset=1)
        distances.append(pairwise[upper[0], upper[1]].mean())
    return torch.stack(distances) if distances else None
