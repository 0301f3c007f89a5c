"""The embedded tiny world: a text-to-image model of coloured 16x16 digits and its reward models.

- :mod:`dense_rl.models.tiny.data`: captioned coloured digits (scikit-learn's handwritten digits).
- :mod:`dense_rl.models.tiny.pretrain`: ``python -m dense_rl.models.tiny.pretrain`` trains the
  pixel-space diffusers pipeline shipped in ``dense_rl/assets/tiny-t2i``.
- :mod:`dense_rl.models.tiny.train_rewards`: ``python -m dense_rl.models.tiny.train_rewards`` trains
  the digit/colour classifier and the Bradley-Terry preference model in ``dense_rl/assets/rewards``.
- :mod:`dense_rl.models.tiny.nets`: the reward CNNs (used by :mod:`dense_rl.rewards.tiny`).

Modules are imported lazily: importing this package loads nothing heavy.
"""

from pathlib import Path

ASSETS = Path(__file__).resolve().parents[2] / "assets"
TINY_T2I_PATH = ASSETS / "tiny-t2i"
REWARDS_PATH = ASSETS / "rewards"

# Recommended sampling settings for the shipped tiny model (see its README.md for measurements).
DEFAULT_NUM_STEPS = 20
DEFAULT_GUIDANCE_SCALE = 4.0
DEFAULT_ETA = 1.0

__all__ = ["ASSETS", "TINY_T2I_PATH", "REWARDS_PATH", "DEFAULT_NUM_STEPS", "DEFAULT_GUIDANCE_SCALE", "DEFAULT_ETA"]
