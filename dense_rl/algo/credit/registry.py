"""The credit modes, by name. A mode is one `CreditMode`, defined and registered in its own module of
this package (verl keeps its advantage estimators the same way): adding one is one file.

A mode says what it needs from a batch and how it weights the steps; the rest of the pipeline (the
sampler, scoring, both normalisation stages, PPO) asks it and never compares mode names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CreditInputs:
    """What a scored batch of B trajectories of T steps offers credit assignment."""

    final_rewards: torch.Tensor  # [B], the trained reward of each final sample
    num_steps: int
    window_size: int
    cosines: torch.Tensor | None = None  # [B, T]: cos(predicted clean sample at step k, final sample)
    boundary_rewards: torch.Tensor | None = None  # [B, J]: the trained reward at each window boundary


# (step weights [B, T], each row summing to 1; bool [B]: rows that fell back to uniform weights)
StepWeights = Callable[[CreditInputs], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class CreditMode:
    """One way to split a trajectory's advantage over its denoising steps.

    - `step_weights`: the weights from a batch's inputs; None for a mode without step credit (every
      step gets the trajectory's advantage, DDPO), which then skips the second normalisation stage.
    - `windowed`: the weights are constant over windows of `credit.window_size` steps, which must
      divide `sample.num_steps`.
    - `boundaries`: what the rollout must hand the reward role at each window boundary (steps 0, w,
      2w, ...), which it scores into `CreditInputs.boundary_rewards`: "x0", the predicted clean sample
      decoded (no extra model call); "ode", the boundary's latent completed to a clean image by
      deterministic steps (T - k extra denoiser calls from step k); None, nothing.
    """

    name: str
    step_weights: StepWeights | None
    windowed: bool = False
    boundaries: str | None = None

    def __post_init__(self):
        if self.boundaries not in (None, "x0", "ode"):
            raise ValueError(f"credit mode {self.name!r}: boundaries must be None, 'x0' or 'ode', got {self.boundaries!r}")

    @property
    def shapes_step_rewards(self) -> bool:
        """Whether the trajectory advantage is split into step rewards (steps 5-6 of the method)."""
        return self.step_weights is not None

    def boundary_model_calls(self, num_steps: int, window_size: int) -> int:
        """Denoiser calls per trajectory beyond sampling's own (classifier-free guidance not counted)."""
        if self.boundaries != "ode":
            return 0
        return sum(num_steps - k for k in range(0, num_steps, window_size))


_MODES: dict[str, CreditMode] = {}


def register(mode: CreditMode) -> CreditMode:
    if mode.name in _MODES:
        raise ValueError(f"credit mode {mode.name!r} is registered twice")
    _MODES[mode.name] = mode
    return mode


def credit_mode(name: str) -> CreditMode:
    if name not in _MODES:
        raise ValueError(f"unknown credit mode {name!r}; expected one of {', '.join(credit_mode_names())}")
    return _MODES[name]


def credit_mode_names() -> tuple[str, ...]:
    return tuple(sorted(_MODES))
