"""Diffusion pieces: the pipeline loader, the DDIM log-prob step and the trajectory sampler."""
