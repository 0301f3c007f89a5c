"""The algorithm on tensors: credit modes (a registry), the two normalisation stages, the advantages they
give every denoising step, and PPO's loss. No diffusers, no Ray: importable and testable on its own."""
