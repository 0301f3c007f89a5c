"""dense_rl: RL fine-tuning of text-to-image diffusion models with dense step-level rewards (CoCA), on Ray."""

from pathlib import Path

__version__ = "0.1.0"

# What the package ships: the embedded tiny models (NAME-t2i/), their reward models (rewards/) and
# prompt sets (prompts/).
ASSETS = Path(__file__).resolve().parent / "assets"
