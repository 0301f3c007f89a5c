"""The fault-injection plan and the bad-reward mask, without Ray (the system tests are test_faults.py)."""

import json

import pytest
import torch

from dense_rl import chaos
from dense_rl.checks import check_memory
from dense_rl.config import ConfigError, load_config
from dense_rl.recovery import RunFailed, finite_rewards


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
    with pytest.raises(ConfigError, match=r"^sample.batch_size: an epoch of 32 samples .* needs about 8\.4 MiB"):
        check_memory(config, total_memory=1024**2)
    remote = load_config(overrides=["cluster.address=ray://head:10001"])
    check_memory(remote, total_memory=1024**2)  # a remote cluster's memory is not known here
