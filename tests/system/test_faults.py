"""Faults injected into real runs (real Ray, real processes): dying rollout, reward and learner
processes, raising reward models, NaN rewards. One Ray session serves every test of the module; the
fault plan (dense_rl.system.faults) is a file each test rewrites. docs/reliability.md lists what each proves."""

from __future__ import annotations

import json
import logging
import os
import threading
import time

import numpy as np
import pytest
import ray
import torch

from dense_rl.config import RunFailed, load_config
from dense_rl.diffusion.lora import lora_state_dict, read_lora_file
from dense_rl.rewards import WeightedRewards
from dense_rl.run.storage import RunDir
from dense_rl.system import faults as chaos
from dense_rl.system.recovery import wait_until_alive
from dense_rl.system.session import run_system
from dense_rl.training import trainer as loop
from dense_rl.training.prompts import choose_prompts, load_prompts

pytestmark = pytest.mark.slow

FAST = [
    "cluster.address=local", "cluster.num_reward_workers=1", "cluster.num_learner_workers=1",
    "sample.num_steps=10", "sample.batch_size=8", "sample.samples_per_prompt=4", "train.batch_size=8",
]


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory):
    """A private Ray instance whose every process reads the fault plan named in DENSE_RL_CHAOS."""
    plan = tmp_path_factory.mktemp("chaos") / "plan.json"
    plan.write_text("[]")
    os.environ[chaos.ENV] = str(plan)
    ray.init(address="local", num_cpus=6, logging_level=logging.ERROR, log_to_driver=False)
    yield plan
    ray.shutdown()
    del os.environ[chaos.ENV]


def set_plan(plan, faults: list[dict]) -> None:
    for marker in plan.parent.glob(plan.name + ".*"):
        marker.unlink()
    plan.write_text(json.dumps(faults))


def config_for(tmp_path, name, *overrides):
    return load_config("configs/tiny.yaml", [*FAST, f"run.output_dir={tmp_path}", f"run.name={name}", *overrides])


def expected_prompts(config, epoch: int) -> list[str]:
    """The prompts of an epoch, in batch order, as the driver draws them (seed and epoch alone decide)."""
    rng, prompts, sample = np.random.default_rng([config.run.seed, epoch]), load_prompts(config.sample.prompts), config.sample
    return [p for _ in range(sample.num_batches_per_epoch)
            for p in choose_prompts(rng, prompts, sample.batch_size, sample.samples_per_prompt)]


def assert_rollouts_hold_the_checkpoint(driver, run: RunDir, version: int) -> None:
    latest = run.latest_checkpoint()
    assert latest["epoch"] == version
    saved = read_lora_file(f"{run.uri}/{latest['path']}")
    for worker_version, weights in ray.get([w.weights.remote() for w in driver.rollout_workers]):
        assert worker_version == version
        for key in saved:
            torch.testing.assert_close(weights[key], saved[key], rtol=0, atol=0)


def test_rollout_actor_killed_mid_epoch_keeps_the_epoch_whole(plan_file, tmp_path, caplog):
    """Epoch 1: a rollout process SIGKILLs itself mid-batch. Epoch 2: the test ray.kill()s one while
    it is sampling. Each restarts, its batch is issued again, and the epoch has exactly its samples."""
    set_plan(plan_file, [
        {"point": "rollout", "version": 1, "action": "sigkill", "times": 1},
        {"point": "rollout", "version": 2, "action": "pause", "seconds": 60, "times": 1},
    ])
    config = config_for(tmp_path, "rollout", "run.num_epochs=3", "cluster.num_rollout_workers=2",
                        "sample.num_batches_per_epoch=4", "train.batch_size=16")
    run, killed, alive = RunDir(f"{tmp_path}/rollout"), [], []

    def kill_the_paused_one(driver):
        # No actor call here: it would wait behind the paused batch. The marker names the actor.
        by_id = {w._actor_id.hex(): w for w in driver.rollout_workers}
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            for marker in plan_file.parent.glob(plan_file.name + ".paused-*"):
                if marker.read_text():
                    ray.kill(by_id[marker.read_text()], no_restart=False)
                    killed.append(marker.read_text())
                    return
            time.sleep(0.2)

    def on_epoch(driver, metrics):
        if metrics["epoch"] == 0:
            threading.Thread(target=kill_the_paused_one, args=(driver,), daemon=True).start()
        if metrics["epoch"] == 2:  # both killed actors were restarted (max_restarts) and answer
            alive.append(all(wait_until_alive(w) for w in driver.rollout_workers))

    with caplog.at_level(logging.WARNING, logger="dense_rl"):
        history = run_system(config, run.uri, show_progress=False, on_epoch=on_epoch)

    assert [m["epoch"] for m in history] == [0, 1, 2] and killed and alive == [True]
    for epoch in range(3):
        rows = run.read_table(f"samples/epoch-{epoch:04d}.parquet")
        # Exactly the configured samples, in batch order: none lost, none twice.
        assert [row["prompt"] for row in rows] == expected_prompts(config, epoch)
        assert {row["policy_version"] for row in rows} == {epoch}
    reissued = [r.message for r in caplog.records if "issuing it again" in r.message]
    assert any("of epoch 1" in m for m in reissued) and any("of epoch 2" in m for m in reissued)


def test_reward_failures_are_retried_then_stop_the_run_naming_the_reward(plan_file, tmp_path, caplog):
    """Epoch 0: the reward process dies (restarts, retried). Epoch 1: the reward model raises once
    (retried). Epoch 2: it raises on every try: the run stops with the reward and the cause named,
    and the checkpoints of epochs 1 and 2 stay whole."""
    set_plan(plan_file, [
        {"point": "reward", "name": "preference", "version": 0, "action": "sigkill", "times": 1},
        {"point": "reward", "name": "preference", "version": 1, "action": "raise", "times": 1,
         "message": "CUDA error: an illegal memory access"},
        {"point": "reward", "name": "preference", "version": 2, "action": "raise", "times": 99,
         "message": "reward server returned 503"},
    ])
    config = config_for(tmp_path, "reward", "run.num_epochs=4", "cluster.num_rollout_workers=1",
                        "sample.num_batches_per_epoch=1")
    run = RunDir(f"{tmp_path}/reward")
    with caplog.at_level(logging.WARNING, logger="dense_rl"), pytest.raises(RunFailed) as failure:
        run_system(config, run.uri, show_progress=False)

    message = str(failure.value)
    assert message.startswith("rewards: reward 'preference' raised RuntimeError: reward server returned 503")
    assert "gave up after 3 attempts (cluster.reward_retries=2)" in message and "\n" not in message
    warnings = " ".join(r.message for r in caplog.records)
    assert "the reward actor for 'preference' failed" in warnings and "illegal memory access" in warnings
    assert run.latest_checkpoint()["epoch"] == 2
    assert [row["epoch"] for row in run.read_table("metrics.parquet")] == [0, 1]
    assert read_lora_file(f"{run.uri}/{run.latest_checkpoint()['path']}")
    assert run.read_json("registry.json")["status"] == "failed"


def test_bad_rewards_are_dropped_and_counted_and_all_bad_stops(plan_file, tmp_path, caplog):
    """Epoch 1: three NaN/inf rewards, dropped and counted. Epoch 2: every reward bad: the run stops."""
    set_plan(plan_file, [
        {"point": "reward_values", "version": 1, "action": "nan", "rows": [0, 3, 5], "times": 1},
        {"point": "reward_values", "version": 2, "action": "nan", "times": 99},
    ])
    config = config_for(tmp_path, "nan", "run.num_epochs=3", "cluster.num_rollout_workers=1",
                        "sample.num_batches_per_epoch=2", "train.batch_size=16")
    run = RunDir(f"{tmp_path}/nan")
    with caplog.at_level(logging.WARNING, logger="dense_rl"), pytest.raises(RunFailed, match=(
            r"^rewards: every reward of epoch 2 is NaN or infinite \(16 samples\); check the reward model")):
        run_system(config, run.uri, show_progress=False)

    metrics = run.read_table("metrics.parquet")
    assert [m["bad_rewards"] for m in metrics] == [0, 3]
    assert all(np.isfinite(m[k]) for m in metrics for k in ("adv_std", "learner_policy_loss"))  # NaN kept out of both
    assert "epoch 1: 3 of 16 rewards are NaN or infinite; dropped from the update" in caplog.text
    # The trackers never saw a NaN, and the checkpoint of epoch 2 is whole and finite.
    state = run.read_json(f"{run.latest_checkpoint()['path']}/driver_state.json")
    values = [v for buffer in state["reward_tracker"]["buffers"].values() for row in buffer for v in np.ravel(row)]
    assert values and np.isfinite(values).all() and run.latest_checkpoint()["epoch"] == 2
    assert all(torch.isfinite(v).all() for v in read_lora_file(f"{run.uri}/{run.latest_checkpoint()['path']}").values())

    # The bad samples are out of the update (13 rows: one minibatch of train.batch_size=16), while
    # samples/ still lists every sample with its reward. The in-process loop, given NaN on the same
    # rows, drops them the same way and shuffles with the same seeds: it ends with the same LoRA.
    rows = run.read_table("samples/epoch-0001.parquet")
    bad = [i for i, row in enumerate(rows) if not np.isfinite(row["reward"])]
    assert len(rows) == 16 and len(bad) == 3 and metrics[1]["learner_optimizer_steps"] == 1

    class BadRowsInEpochOne(WeightedRewards):
        calls = 0  # the loop scores each epoch's samples in one call: the second call is epoch 1's

        def __call__(self, images, prompts):
            total, components = super().__call__(images, prompts)
            BadRowsInEpochOne.calls += 1
            if BadRowsInEpochOne.calls == 2:
                total = total.clone()
                total[bad] = float("nan")
            return total, components

    loop_config = config_for(tmp_path, "nan-loop", "run.num_epochs=2", "sample.num_batches_per_epoch=2",
                             "train.batch_size=16")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "WeightedRewards", BadRowsInEpochOne)
        history = loop.train(loop_config, show_progress=False, keep_policy=(kept := {}))
    assert [m["bad_rewards"] for m in history] == [0, 3]
    # The two updates (trained minus initial LoRA) agree up to rounding: the actors run on 1 thread and
    # score batches of 8, the loop here on 2 threads and 16 (Adam can amplify that in a weight whose
    # gradient is near 0, so the whole update is compared, not each weight).
    initial = lora_state_dict(loop.build_policy(loop_config)[0].unet)
    ray_lora = read_lora_file(f"{run.uri}/{run.latest_checkpoint()['path']}")
    loop_lora = lora_state_dict(kept["pipe"].unet)
    ray_update = torch.cat([(ray_lora[k] - initial[k]).flatten() for k in initial])
    loop_update = torch.cat([(loop_lora[k] - initial[k]).flatten() for k in initial])
    assert ray_update.norm() > 0 and (loop_update - ray_update).norm() < 1e-3 * ray_update.norm()


def test_learner_worker_killed_restarts_from_checkpoint_and_rollouts_get_its_weights(plan_file, tmp_path, caplog):
    """Epoch 1: learner rank 1 SIGKILLs itself with the epoch taken, after its update. The group
    restarts from the checkpoint of version 1, the driver serves epoch 1 again, the rollouts
    hold the restored and then the new weights, and the run finishes."""
    set_plan(plan_file, [{"point": "learner", "version": 1, "rank": 1, "action": "sigkill", "times": 1}])
    config = config_for(tmp_path, "learner", "run.num_epochs=3", "cluster.num_rollout_workers=1",
                        "cluster.num_learner_workers=2", "sample.num_batches_per_epoch=2", "train.batch_size=16")
    run, seen = RunDir(f"{tmp_path}/learner"), []

    def on_epoch(driver, metrics):
        assert_rollouts_hold_the_checkpoint(driver, run, metrics["policy_version"])
        seen.append(metrics["policy_version"])

    with caplog.at_level(logging.WARNING, logger="dense_rl"):
        history = run_system(config, run.uri, show_progress=False, on_epoch=on_epoch)
    assert seen == [1, 2, 3] and [m["epoch"] for m in history] == [0, 1, 2]
    assert "learner group restarted from its checkpoint of version 1" in caplog.text
    assert all(np.isfinite(m["learner_policy_loss"]) for m in history)
    assert [row["epoch"] for row in run.read_table("metrics.parquet")] == [0, 1, 2]


def test_a_learner_that_keeps_failing_stops_the_run_after_its_restarts(plan_file, tmp_path, caplog):
    """Epoch 1: learner rank 0 raises after every update. With cluster.learner_failures=1 the group is
    restarted once from the checkpoint of version 1, fails again, and the run stops naming the budget
    and the cause; the checkpoint of version 1 stays the newest, whole."""
    set_plan(plan_file, [{"point": "learner", "version": 1, "rank": 0, "action": "raise", "times": 99,
                          "message": "NCCL watchdog timeout"}])
    config = config_for(tmp_path, "learner-fails", "run.num_epochs=3", "cluster.num_rollout_workers=1",
                        "cluster.learner_failures=1", "sample.num_batches_per_epoch=1")
    run = RunDir(f"{tmp_path}/learner-fails")
    with caplog.at_level(logging.WARNING, logger="dense_rl"), pytest.raises(RunFailed) as failure:
        run_system(config, run.uri, show_progress=False)

    message = str(failure.value)
    assert message.startswith("the learner group failed 2 times (cluster.learner_failures=1); last: ")
    assert "NCCL watchdog timeout" in message and "\n" not in message
    assert caplog.text.count("learner group restarted from its checkpoint of version 1") == 1
    assert run.latest_checkpoint()["epoch"] == 1
    assert read_lora_file(f"{run.uri}/{run.latest_checkpoint()['path']}")
    assert [row["epoch"] for row in run.read_table("metrics.parquet")] == [0]
