"""The fault-injection plan, the bad-reward mask, refused reward outputs and failed actor starts, without
Ray (the system tests are test_faults.py)."""

import json
import logging
import pickle
import traceback

import numpy as np
import pytest
import torch

from dense_rl.config import ConfigError, RunFailed, load_config
from dense_rl.config.preflight import check_memory
from dense_rl.rewards import RewardFailed
from dense_rl.system import faults as chaos
from dense_rl.system.errors import ActorStartFailed, start_errors, start_failure
from dense_rl.training.scoring import finite_rewards


def test_a_fault_fires_where_planned_and_only_as_often_as_planned(tmp_path, monkeypatch):
    assert chaos.fire("rollout", 1) is None  # no plan: every hook is a no-op
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps([
        {"point": "reward", "name": "preference", "version": 2, "action": "raise", "times": 2, "message": "boom"},
    ]))
    monkeypatch.setenv(chaos.ENV, str(plan))
    assert chaos.fire("reward", 1, name="preference") is None  # another version
    assert chaos.fire("reward", 2, name="aesthetic") is None  # another reward
    assert chaos.fire("rollout", 2) is None  # another point
    for _ in range(2):
        with pytest.raises(RuntimeError, match="^boom$"):
            chaos.strike("reward", 2, name="preference")
    assert chaos.strike("reward", 2, name="preference") is None  # its two firings are spent


def test_bad_rewards_are_masked_and_all_bad_is_an_error(caplog):
    good = finite_rewards(torch.tensor([1.0, float("nan"), 2.0, float("inf")]), epoch=3)
    assert good.tolist() == [True, False, True, False]
    assert "epoch 3: 2 of 4 rewards are NaN or infinite" in caplog.text
    with pytest.raises(RunFailed, match=r"^rewards: every reward of epoch 4 is NaN or infinite \(2 samples\)"):
        finite_rewards(torch.tensor([float("nan"), float("-inf")]), epoch=4)


def test_memory_estimate_scales_with_the_epoch():
    config = load_config(overrides=["cluster.address=local"])
    check_memory(config, total_memory=2 * 1024**3)  # 32 tiny samples fit in 2 GiB
    # 2 x 32 x (21 latents of 3x16x16 in float32 + an 8-bit image + prompt embeddings) = 4.3 MiB.
    with pytest.raises(ConfigError, match=r"^sample.batch_size: an epoch of 32 samples .* needs about 4\.3 MiB"):
        check_memory(config, total_memory=1024**2)
    # reward_gain also ships the 4 window boundaries' 8-bit images: 4 x 768 B more per sample.
    dense = load_config(overrides=["cluster.address=local", "credit.mode=reward_gain"])
    with pytest.raises(ConfigError, match=r"needs about 4\.4 MiB"):
        check_memory(dense, total_memory=1024**2)
    remote = load_config(overrides=["cluster.address=ray://head:10001"])
    check_memory(remote, total_memory=1024**2)  # a remote cluster's memory is not known here


def reward_returning(value):
    """WeightedRewards around one reward 'stub' that returns `value` (built per call from the batch size)."""
    from dense_rl.rewards import WeightedRewards

    rewards = WeightedRewards([])
    rewards.weights, rewards.rewards = {"stub": 1.0}, {"stub": lambda images, prompts: value(len(prompts))}
    return rewards


def test_a_reward_that_returns_no_float_per_image_is_refused_with_its_name():
    images, prompts = torch.zeros(4, 3, 8, 8), ["a"] * 4
    refused = [
        (lambda b: torch.ones(b, dtype=torch.int64),
         r"^reward 'stub' returned a Tensor of dtype int64 and shape \[4\]; expected a float tensor of shape \[4\]"),
        (lambda b: torch.ones(b, dtype=torch.bool), r"^reward 'stub' returned a Tensor of dtype bool"),
        (lambda b: torch.ones(b, 1), r"^reward 'stub' returned a Tensor of dtype float32 and shape \[4, 1\]; expected"),
        (lambda b: torch.ones(b - 1), r"shape \[3\]; expected a float tensor of shape \[4\] \(one reward per image\)$"),
        (lambda b: torch.tensor(1.0), r"shape \[\]; expected"),
        (lambda b: [1.0] * b, r"^reward 'stub' returned a list; expected a float tensor of shape \[4\]$"),
        (lambda b: None, r"^reward 'stub' returned a NoneType"),
        (lambda b: np.ones(b, dtype=np.int32), r"^reward 'stub' returned a ndarray of dtype int32 and shape \[4\]"),
    ]
    for value, message in refused:
        with pytest.raises(RewardFailed, match=message):
            reward_returning(value)(images, prompts)
    # NaN and +-inf pass (the update leaves those samples out); float64 arrays become float32 tensors.
    total, components = reward_returning(lambda b: np.array([1.0, np.nan, np.inf, -np.inf]))(images, prompts)
    assert components["stub"].dtype == torch.float32 and total[0] == 1 and not torch.isfinite(total[1:]).any()


def test_reward_failed_keeps_its_message_across_processes():
    error = pickle.loads(pickle.dumps(RewardFailed("hps", ValueError("bad weights"))))
    assert str(error) == "reward 'hps' raised ValueError: bad weights" and error.name == "hps"


def test_a_failed_constructor_becomes_one_line_with_its_innermost_cause():
    class Actor:
        @start_errors
        def __init__(self, path):
            try:
                open(path)
            except FileNotFoundError as error:
                raise OSError(f"Unable to load weights from {path}.\nCheckout your internet connection") from error

    with pytest.raises(ActorStartFailed) as failure:
        Actor("/no/such/weights.safetensors")
    line = ("OSError: Unable to load weights from /no/such/weights.safetensors. (cause: FileNotFoundError: "
            "[Errno 2] No such file or directory: '/no/such/weights.safetensors')")
    assert str(failure.value) == line
    # What Ray hands the driver is the traceback's text; the marker finds the line in it.
    ray_text = "The actor died because of an error raised in its creation task, ray::X.__init__()\n" + "".join(
        traceback.format_exception(failure.value))
    assert start_failure(ray_text) == line and start_failure("ActorDiedError: killed") is None


def test_kept_rows_are_split_evenly_across_learner_ranks(caplog):
    """13 kept rows of 2 rollout batches of 8 on 2 ranks: 6 each, in order, the 13th left out (DDP ranks
    must take the same number of optimizer steps); too few rows for the ranks stops the run."""
    from dense_rl.system.roles.learner import rank_shares

    kept = [1, 2, 4, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    with caplog.at_level(logging.INFO, logger="dense_rl"):
        share, shares = rank_shares(kept, num_ranks=2, rows_per_batch=8, epoch=3)
    assert share == 6
    assert shares == [[(0, [1, 2, 4, 6, 7]), (1, [0])], [(1, [1, 2, 3, 4, 5, 6])]]
    assert "epoch 3: 1 of 13 samples left out of the update so each of the 2 learner ranks trains on 6" in caplog.text
    assert rank_shares(list(range(16)), 1, 8, epoch=0) == (16, [[(0, list(range(8))), (1, list(range(8)))]])
    with pytest.raises(RunFailed, match=r"^rewards: epoch 5 has 1 samples with a finite reward, fewer than "
                                        r"cluster.num_learner_workers=2"):
        rank_shares([3], 2, 8, epoch=5)
