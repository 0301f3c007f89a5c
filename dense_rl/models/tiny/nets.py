"""Small CNNs for the tiny world's reward models.

Both networks take RGB images [B,3,16,16] in [0,1]. Their architecture is described by a plain
JSON-able config dict (shipped next to the weights), and weights are stored as safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn


def _trunk(channels: tuple[int, int]) -> nn.Sequential:
    c1, c2 = channels
    return nn.Sequential(
        nn.Conv2d(3, c1, 3, padding=1), nn.GELU(),
        nn.Conv2d(c1, c1, 3, padding=1), nn.GELU(),
        nn.MaxPool2d(2),  # 8x8
        nn.Conv2d(c1, c2, 3, padding=1), nn.GELU(),
        nn.Conv2d(c2, c2, 3, padding=1), nn.GELU(),
        nn.MaxPool2d(2),  # 4x4
        nn.Flatten(),
    )


class DigitColorNet(nn.Module):
    """Two-headed classifier: which digit (10 classes) and which colour (6 classes)."""

    def __init__(self, channels: tuple[int, int] = (32, 64), hidden: int = 128,
                 num_digits: int = 10, num_colors: int = 6, dropout: float = 0.2):
        super().__init__()
        self.config = {"arch": "DigitColorNet", "channels": list(channels), "hidden": hidden,
                       "num_digits": num_digits, "num_colors": num_colors, "dropout": dropout}
        self.features = _trunk(tuple(channels))
        self.fc = nn.Sequential(nn.Linear(channels[1] * 16, hidden), nn.GELU(), nn.Dropout(dropout))
        self.digit_head = nn.Linear(hidden, num_digits)
        self.color_head = nn.Linear(hidden, num_colors)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.fc(self.features(x * 2.0 - 1.0))
        return self.digit_head(h), self.color_head(h)


class PreferenceNet(nn.Module):
    """Scalar quality scorer (a Bradley-Terry reward model)."""

    def __init__(self, channels: tuple[int, int] = (32, 64), hidden: int = 128, dropout: float = 0.1):
        super().__init__()
        self.config = {"arch": "PreferenceNet", "channels": list(channels), "hidden": hidden,
                       "dropout": dropout}
        self.features = _trunk(tuple(channels))
        self.fc = nn.Sequential(nn.Linear(channels[1] * 16, hidden), nn.GELU(), nn.Dropout(dropout))
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(self.features(x * 2.0 - 1.0))).squeeze(-1)


ARCHS = {"DigitColorNet": DigitColorNet, "PreferenceNet": PreferenceNet}


def build_from_config(config: dict) -> nn.Module:
    cfg = dict(config)
    arch = cfg.pop("arch", None)
    if arch not in ARCHS:
        raise ValueError(f"unknown reward network architecture {arch!r}; expected one of {sorted(ARCHS)}")
    cfg.pop("meta", None)
    if "channels" in cfg:
        cfg["channels"] = tuple(cfg["channels"])
    return ARCHS[arch](**cfg)


def save_net(net: nn.Module, weights_path: str | Path, meta: dict | None = None) -> None:
    """Write ``<name>.safetensors`` and the architecture config ``<name>.json`` next to it."""
    from safetensors.torch import save_file

    weights_path = Path(weights_path)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(weights_path), metadata={"arch": net.config["arch"]})
    cfg = dict(net.config)
    if meta:
        cfg["meta"] = meta
    weights_path.with_suffix(".json").write_text(json.dumps(cfg, indent=2) + "\n")


def load_net(weights_path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a reward network from ``<name>.safetensors`` + ``<name>.json`` (no pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights_path = Path(weights_path)
    config_path = weights_path.with_suffix(".json")
    if not weights_path.is_file():
        raise FileNotFoundError(f"reward model weights not found: {weights_path}")
    if not config_path.is_file():
        raise FileNotFoundError(f"reward model config not found: {config_path} (needed for {weights_path})")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read reward model config {config_path}: {e}") from e
    net = build_from_config(config)
    try:
        state = load_file(str(weights_path), device=str(map_location))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"cannot read reward model weights {weights_path}: {e}") from e
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"reward model weights {weights_path} do not match config {config_path}: {e}") from e
    return net.to(map_location).eval()
