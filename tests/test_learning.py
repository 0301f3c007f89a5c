"""A short CoCA run on the embedded model raises the preference reward clearly above the base model."""

import pytest
import torch

from dense_rl.config import load_config
from dense_rl.loop import build_policy, evaluate, train
from dense_rl.prompts import load_prompts
from dense_rl.rewards import WeightedRewards

pytestmark = pytest.mark.slow


def test_coca_run_beats_the_base_model_on_heldout_prompts():
    config = load_config("configs/tiny.yaml", ["run.num_epochs=8"])
    rewards = WeightedRewards(config.rewards)
    heldout = load_prompts("embedded:tiny_heldout")

    base_pipe, _ = build_policy(config)
    base = evaluate(base_pipe, config, rewards, heldout, seed=1234)["reward"]

    pipe_holder = {}
    history = train(config, show_progress=False, keep_policy=pipe_holder)
    tuned = evaluate(pipe_holder["pipe"], config, rewards, heldout, seed=1234)["reward"]

    print(f"held-out preference: base {base:.3f} -> tuned {tuned:.3f}; "
          f"training reward {history[0]['reward_mean']:.3f} -> {history[-1]['reward_mean']:.3f}")
    assert all(torch.isfinite(torch.tensor(m["reward_mean"])) for m in history)
    assert tuned > base + 0.5
