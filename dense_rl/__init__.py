"""dense_rl: RL fine-tuning of text-to-image diffusion models with dense step-level rewards (CoCA), on Ray."""

__version__ = "0.1.0"
