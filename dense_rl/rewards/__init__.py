"""Reward functions: `reward(images [B,3,H,W] in [0,1], prompts) -> float [B]`, built by name; an
output of another type or shape is refused with the reward's name (`checked_rewards`).

Each backend lives in its own module and is imported only when built, so validating a config never
loads a model.
"""

from __future__ import annotations

import importlib
from typing import Protocol

import numpy as np
import torch

# name -> (module, class)
_BACKENDS = {
    "preference": ("dense_rl.rewards.tiny", "PreferenceReward"),
    "digit_alignment": ("dense_rl.rewards.tiny", "DigitAlignmentReward"),
    "jpeg_compressibility": ("dense_rl.rewards.jpeg", "JpegCompressibility"),
    "jpeg_incompressibility": ("dense_rl.rewards.jpeg", "JpegIncompressibility"),
    "brightness": ("dense_rl.rewards.brightness", "Brightness"),
    "darkness": ("dense_rl.rewards.brightness", "Darkness"),
    "aesthetic": ("dense_rl.rewards.aesthetic", "AestheticReward"),
    "hps": ("dense_rl.rewards.hps", "HPSReward"),
    "hps_v2.0": ("dense_rl.rewards.hps", "HPSv20Reward"),
    "pickscore": ("dense_rl.rewards.pickscore", "PickScore"),
    "imagereward": ("dense_rl.rewards.imagereward", "ImageRewardScorer"),
}
REWARD_NAMES = frozenset(_BACKENDS)
# Backends that score pixels with no weights of their own take no path or device.
_WEIGHTLESS = {"jpeg_compressibility", "jpeg_incompressibility", "brightness", "darkness"}
# Backends that always compute in float32; every other one takes a `dtype` ("auto": fp16 on CUDA).
FLOAT32_ONLY = frozenset({"preference", "digit_alignment", "jpeg_compressibility", "jpeg_incompressibility",
                          "brightness", "darkness"})


class RewardFunction(Protocol):
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor: ...


def build_reward(name: str, path: str | None = None, device: str = "cpu", dtype: str = "auto") -> RewardFunction:
    if name not in _BACKENDS:
        raise ValueError(f"unknown reward {name!r}; choose one of {', '.join(sorted(REWARD_NAMES))}")
    module_name, class_name = _BACKENDS[name]
    cls = getattr(importlib.import_module(module_name), class_name)
    if name in _WEIGHTLESS:
        return cls()
    if name in FLOAT32_ONLY:
        return cls(path=path, device=device)
    return cls(path=path, device=device, dtype=dtype)


class WeightedRewards:
    """Several rewards combined as a weighted sum; also reports each component."""

    def __init__(self, specs, device: str = "cpu"):
        self.weights = {spec.name: spec.weight for spec in specs}
        self.rewards = {spec.name: build_reward(spec.name, spec.path, device, spec.dtype) for spec in specs}

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        components = {}
        for name, reward in self.rewards.items():
            try:
                value = reward(images, prompts)
            except Exception as error:  # named here, so the run's error says which reward failed
                raise RewardFailed(name, error) from error
            components[name] = checked_rewards(name, value, len(prompts))
        total = sum(self.weights[name] * value for name, value in components.items())
        return total, components


def checked_rewards(name: str, value, batch_size: int) -> torch.Tensor:
    """A reward's output as float32 [B] on CPU, or RewardFailed naming what it returned. NaN and +-inf
    pass: they mark a sample without a usable reward, which the update leaves out (finite_rewards)."""
    if isinstance(value, np.ndarray):
        floating, shape, dtype = np.issubdtype(value.dtype, np.floating), tuple(value.shape), str(value.dtype)
    elif isinstance(value, torch.Tensor):
        floating, shape, dtype = value.is_floating_point(), tuple(value.shape), str(value.dtype).removeprefix("torch.")
    else:
        raise RewardFailed(name, f"returned a {type(value).__name__}; expected a float tensor of shape [{batch_size}]")
    if not floating or shape != (batch_size,):
        raise RewardFailed(name, f"returned a {type(value).__name__} of dtype {dtype} and shape {list(shape)}; expected "
                                 f"a float tensor of shape [{batch_size}] (one reward per image)")
    return torch.as_tensor(value).detach().float().cpu()


class RewardFailed(RuntimeError):
    """A reward model raised, or returned something that is not a reward per image; the message names
    the reward and what happened (`what`: an exception, or a description of the bad output)."""

    def __init__(self, name: str, what: BaseException | str):
        if isinstance(what, BaseException):
            what = f"raised {type(what).__name__}: {what}"
        super().__init__(f"reward {name!r} {what}")
        self.name, self.what = name, what

    def __reduce__(self):  # picklable across Ray processes with the same message
        return RewardFailed, (self.name, self.what)
