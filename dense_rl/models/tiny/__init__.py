"""The embedded tiny world: text-to-image models of coloured 16x16 digits and their reward models.

- :mod:`dense_rl.models.tiny.data`: captioned coloured digits (scikit-learn's handwritten digits).
- :mod:`dense_rl.models.tiny.train.pretrain`: ``python -m dense_rl.models.tiny.train.pretrain`` trains the
  pixel-space diffusers pipeline shipped in ``dense_rl/assets/tiny-t2i`` (``embedded:tiny``, a UNet
  sampled with DDIM).
- :mod:`dense_rl.models.tiny.train.pretrain_flow`: ``python -m dense_rl.models.tiny.train.pretrain_flow`` trains the
  pixel-space ``StableDiffusion3Pipeline`` shipped in ``dense_rl/assets/tiny-flow-t2i``
  (``embedded:tiny-flow``, a rectified-flow ``SD3Transformer2DModel`` sampled with the flow SDE).
- :mod:`dense_rl.models.tiny.train.rewards`: ``python -m dense_rl.models.tiny.train.rewards`` trains
  the digit/colour classifier and the Bradley-Terry preference model in ``dense_rl/assets/rewards``.
- :mod:`dense_rl.models.tiny.nets`: the reward CNNs (used by :mod:`dense_rl.rewards.tiny`).
- :mod:`dense_rl.models.tiny.train.evaluation`: digit/colour accuracy and preference of a sampler, used by
  both pretraining scripts.

See docs/tiny_model.md.

Modules are imported lazily: importing this package loads nothing heavy.
"""

from dense_rl import ASSETS

TINY_T2I_PATH = ASSETS / "tiny-t2i"
REWARDS_PATH = ASSETS / "rewards"

# Recommended sampling settings for the shipped tiny DDIM model (see its README.md for measurements).
# The flow model's (20 Euler steps, guidance 4.0) are in dense_rl.models.tiny.train.pretrain_flow.
DEFAULT_NUM_STEPS = 20
DEFAULT_GUIDANCE_SCALE = 4.0
DEFAULT_ETA = 1.0

__all__ = ["ASSETS", "TINY_T2I_PATH", "REWARDS_PATH", "DEFAULT_NUM_STEPS", "DEFAULT_GUIDANCE_SCALE", "DEFAULT_ETA"]
