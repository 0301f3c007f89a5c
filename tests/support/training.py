"""Helpers for tests of the update: an optimizer that records gradients, a LoRA that is not the base model."""

from __future__ import annotations

import torch


class GradientRecorder(torch.optim.SGD):
    """An optimizer that changes nothing and keeps the gradient of every step it is asked to take."""

    def __init__(self, params):
        super().__init__(params, lr=0.0)
        self.grads: list[torch.Tensor] = []

    def step(self, closure=None):
        self.grads.append(torch.cat([p.grad.flatten().clone() for p in self.param_groups[0]["params"]]))


def with_lora(pipe, seed: int = 0, scale: float = 0.2, rank: int = 4) -> list:
    """A seeded LoRA on the attention projections with non-zero B weights, so the policy differs from
    the base model and the adapter takes part in every forward pass; returns its parameters."""
    from dense_rl.diffusion.lora import add_lora

    torch.manual_seed(seed)
    params = add_lora(pipe.unet, rank, float(rank), ["to_q", "to_k", "to_v", "to_out.0"])
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * scale)
    return params


