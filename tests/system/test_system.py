"""End to end through real Ray: 2 rollout actors, 1 reward actor, a 2-worker DDP learner group, for
both sampler families (the embedded DDIM model and the embedded flow-matching model)."""

import dataclasses
import json
import urllib.request

import pytest
import torch

from dense_rl.config import load_config
from dense_rl.diffusion.lora import read_lora_file
from dense_rl.run.storage import RunDir
from dense_rl.system.session import run_system

pytestmark = pytest.mark.slow

SMALL = [
    "cluster.address=local",
    "cluster.num_rollout_workers=2", "cluster.num_reward_workers=1", "cluster.num_learner_workers=2",
    "sample.batch_size=8", "sample.num_batches_per_epoch=2", "train.batch_size=8",
]


FAMILIES = ["configs/tiny.yaml", "configs/tiny-flow.yaml"]


def small_config(tmp_path, *overrides, preset="configs/tiny.yaml"):
    return load_config(preset, [*SMALL, f"run.output_dir={tmp_path}", *overrides])


@pytest.fixture(scope="module", autouse=True)
def ray_session(tmp_path_factory):
    """One private Ray instance for this module's runs (run_system leaves a caller's session running):
    starting Ray costs more than an epoch of the tiny model here."""
    import ray

    from dense_rl.system.session import start_ray

    start_ray(small_config(tmp_path_factory.mktemp("ray")))
    yield
    ray.shutdown()


@pytest.fixture(scope="module", params=FAMILIES)
def six_epochs(request, tmp_path_factory):
    """Six sync epochs of one family, a checkpoint each (save_every 1); after each epoch it records what
    every rollout actor holds against the LoRA the learner saved. Shared by the broadcast test and, as
    the uninterrupted run, by the resume test, for which it copies the run directory as it stands after
    the first epoch (the driver waits for on_epoch, so nothing is written meanwhile): a run stopped
    there, without a second run of Ray's start."""
    import shutil

    import ray

    preset, out = request.param, tmp_path_factory.mktemp("six-epochs")
    # Every checkpoint kept: the resume test compares with the uninterrupted run's second.
    config = small_config(out, "run.name=e2e", "run.num_epochs=6", "run.save_every=1", "checkpoint.keep=6", preset=preset)
    run_dir = RunDir(f"{out}/e2e")
    broadcasts, checkpoints, train_view = [], {}, []

    def check_rollouts(driver, metrics):
        # After epoch k every rollout actor must hold exactly the LoRA the learner saved as version k + 1.
        version = metrics["policy_version"]
        latest = run_dir.latest_checkpoint()
        checkpoints[latest["epoch"]] = latest["path"]
        if version == 1:
            shutil.copytree(f"{out}/e2e", f"{out}/after-one-epoch/e2e")
            # What the Ray dashboard's Train view shows: the runs of Ray Train's state actor.
            with urllib.request.urlopen(f"http://{ray._private.worker.get_dashboard_url()}/api/train/v2/runs/v1") as reply:
                runs = json.load(reply)["train_runs"]
            train_view.extend((run["name"], run["status"], driver.learner.session) for run in runs)
        saved = read_lora_file(f"{out}/e2e/{latest['path']}")
        held = ray.get([w.weights.remote() for w in driver.rollout_workers])
        same = all(held_version == version and weights.keys() == saved.keys()
                   and all(torch.equal(weights[key], saved[key]) for key in saved) for held_version, weights in held)
        broadcasts.append((version, latest["epoch"], same))

    history = run_system(config, f"{out}/e2e", show_progress=False, on_epoch=check_rollouts)
    return {"preset": preset, "out": out, "run": run_dir, "history": history, "broadcasts": broadcasts,
            "checkpoints": checkpoints, "train_view": train_view}


def test_versions_broadcast_and_learning(six_epochs):
    assert six_epochs["broadcasts"] == [(version, version, True) for version in range(1, 7)]
    # The learner group is a Ray Train run that the dashboard's Train view lists while it trains.
    running = [name for name, status, session in six_epochs["train_view"] if status == "RUNNING"]
    assert running == [six_epochs["train_view"][0][2]], six_epochs["train_view"]

    run = six_epochs["run"]
    for epoch in range(6):
        rows = run.read_table(f"samples/epoch-{epoch:04d}.parquet")
        assert len(rows) == 16
        assert {row["policy_version"] for row in rows} == {epoch}  # sync mode: exactly on-policy
        credits = torch.tensor([row["step_credits"] for row in rows])
        torch.testing.assert_close(credits.sum(1), torch.ones(len(rows)), rtol=0, atol=1e-4)  # CoCA weights
        # Normalised uniform fallback would pass the line above: the cosine gains must shape the credit.
        assert not torch.allclose(credits, torch.full_like(credits, 1 / credits.shape[1])), epoch
    assert len(run.read_table("metrics.parquet")) == 6
    assert run.exists("reward_curve.png") and run.exists("images/epoch-0005.png")
    assert run.latest_checkpoint()["epoch"] == 6

    history = six_epochs["history"]
    first, last = history[0]["reward_mean"], max(m["reward_mean"] for m in history[-2:])
    assert last > first + 0.2, [m["reward_mean"] for m in history]


def test_resumed_run_matches_an_uninterrupted_one(six_epochs):
    """The run as it stood after one epoch, resumed with a two-epoch schedule: the LoRA it saves at
    epoch 2 equals the uninterrupted run's (LoRA, optimizer, trackers and epoch come back)."""
    preset, stopped = six_epochs["preset"], f"{six_epochs['out']}/after-one-epoch"
    assert RunDir(f"{stopped}/e2e").latest_checkpoint()["epoch"] == 1
    history = run_system(small_config(stopped, "run.name=e2e", "run.save_every=1", "run.num_epochs=2", preset=preset),
                         f"{stopped}/e2e", show_progress=False)
    assert [m["epoch"] for m in history] == [0, 1]

    whole = read_lora_file(f"{six_epochs['out']}/e2e/{six_epochs['checkpoints'][2]}")
    resumed_run = RunDir(f"{stopped}/e2e")
    assert resumed_run.latest_checkpoint()["epoch"] == 2
    resumed = read_lora_file(f"{stopped}/e2e/{resumed_run.latest_checkpoint()['path']}")
    assert whole.keys() == resumed.keys()
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=1e-5, atol=1e-7)


def test_async_mode_trains_on_samples_at_most_one_version_old(tmp_path):
    config = small_config(tmp_path, "run.name=async", "run.num_epochs=3", "sample.num_steps=10", "cluster.max_policy_lag=1")
    run_system(config, f"{tmp_path}/async", show_progress=False)
    run = RunDir(f"{tmp_path}/async")
    versions = [{row["policy_version"] for row in run.read_table(f"samples/epoch-{e:04d}.parquet")} for e in range(3)]
    # Epoch k + 1 is sampled while the learner makes version k + 1, so with weights of version k.
    assert versions == [{0}, {0}, {1}]
    # Those stale batches were rescored under the learner's weights by the rollout actors, not the learner.
    metrics = run.read_table("metrics.parquet")
    assert [row["learner_off_policy"] for row in metrics] == [0.0, 1.0, 1.0]
    assert [row["learner_proximal_from_rollouts"] for row in metrics] == [0.0, 1.0, 1.0]


def test_set_weights_does_not_wait_behind_queued_generates(tmp_path):
    """set_weights runs in its own concurrency group: it returns while generate calls are still queued,
    and every batch that starts after it samples with the new weights."""
    import ray

    from dense_rl.system.roles.rollout import RolloutWorker

    worker = RolloutWorker.options(num_cpus=1).remote(small_config(tmp_path), 1)
    try:
        ray.get(worker.pid.remote())
        _, state = ray.get(worker.weights.remote())
        new_state = {key: value + 0.01 for key, value in state.items()}
        # The learner's part of each batch (the reward role's is the second return value).
        generates = [worker.generate.remote(["a red digit seven"] * 8, seed)[0] for seed in range(3)]
        ray.get(worker.set_weights.remote(5, [ray.put(new_state)]))
        ready, _ = ray.wait(generates, num_returns=3, timeout=0)
        assert len(ready) < 3, "set_weights waited for the queued generate calls"
        versions = [batch.policy_version for batch in ray.get(generates)]
        assert versions == sorted(versions) and versions[-1] == 5
        version, held = ray.get(worker.weights.remote())
        assert version == 5 and all(torch.equal(held[key], new_state[key]) for key in new_state)
    finally:
        ray.kill(worker)


def test_rescore_gives_the_learners_proximal_log_probs_for_its_version_only(tmp_path):
    """RolloutWorker.rescore: rows of a batch sampled by version 0, rescored once the worker holds version 1,
    equal what the learner's own pass computes with those weights; asked for another version, it has nothing."""
    import ray

    from dense_rl.diffusion.lora import load_lora_state_dict
    from dense_rl.diffusion.pipeline import build_policy, denoiser
    from dense_rl.diffusion.policy import StepPolicy
    from dense_rl.system.roles.rollout import RolloutWorker
    from dense_rl.training.update import proximal_log_probs

    config = small_config(tmp_path)
    worker = RolloutWorker.options(num_cpus=1).remote(config, 1)
    try:
        batch_ref = worker.generate.remote(["a red digit seven"] * 8, 0)[0]
        _, state = ray.get(worker.weights.remote())
        moved = {key: value + 0.01 * torch.randn(value.shape, generator=torch.Generator().manual_seed(1))
                 for key, value in state.items()}
        ray.get(worker.set_weights.remote(1, [ray.put(moved)]))
        rescored = ray.get(worker.rescore.remote([(batch_ref, list(range(8)))], 1))
        some = ray.get(worker.rescore.remote([(batch_ref, [5]), (batch_ref, [2, 7])], 1))
        assert ray.get(worker.rescore.remote([(batch_ref, [0])], 2)) is None
    finally:
        ray.kill(worker)
    batch = ray.get(batch_ref)
    pipe, _ = build_policy(config)
    load_lora_state_dict(denoiser(pipe), moved)
    step_policy = StepPolicy(pipe.scheduler, eta=config.sample.eta)
    step_policy.set_timesteps(batch.num_steps, "cpu")
    expected = proximal_log_probs(denoiser(pipe), step_policy, batch, batch.stochastic_steps, batch_size=config.train.batch_size,
                                  guidance_scale=config.sample.guidance_scale, device=torch.device("cpu"),
                                  dtype=torch.float32)
    assert batch.policy_version == 0 and rescored.shape == batch.log_probs.shape
    torch.testing.assert_close(rescored, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(some, expected[[5, 2, 7]], rtol=1e-5, atol=1e-6)  # the rows asked for, in that order
    assert not torch.allclose(rescored, batch.log_probs, atol=1e-4)  # the weights did move


def test_the_learner_fetches_the_rows_it_asks_for_and_nothing_else():
    """proximal_fetcher: rows come from whichever answers hold them, in the order asked, and only those
    answers are waited for; a rollout on other weights (None) or gone, or a row nobody was asked for,
    gives None, so that the learner computes them itself."""
    import ray

    from dense_rl.system.messages import Work
    from dense_rl.system.roles.learner import proximal_fetcher

    first, second = torch.arange(6.0).reshape(3, 2), -torch.arange(4.0).reshape(2, 2)

    @ray.remote
    def never_answers():
        import time
        time.sleep(60)  # a fetch that waited for it would get None and fail below

    hanging = never_answers.remote()
    try:
        work = Work(1, [], torch.zeros(6, 2), proximal=[(ray.put(first), [4, 0, 2]), (ray.put(second), [1, 5]),
                                                        (hanging, [3])])
        fetch = proximal_fetcher(work)
        torch.testing.assert_close(fetch(torch.tensor([0, 5, 4])), torch.stack([first[1], second[1], first[0]]))
        assert fetch(torch.tensor([0, 6])) is None  # row 6 was never asked for
        stale = proximal_fetcher(Work(1, [], torch.zeros(2, 2), proximal=[(ray.put(None), [0, 1])]))
        assert stale(torch.tensor([1])) is None
    finally:
        ray.cancel(hanging, force=True)
    gone = proximal_fetcher(Work(1, [], torch.zeros(1, 2), proximal=[(hanging, [0])]))
    assert gone(torch.tensor([0])) is None


@pytest.mark.parametrize("mode, preset", [("reward_gain", "configs/tiny.yaml"), ("ode_gain", "configs/tiny-flow.yaml")])
def test_gain_credit_through_ray(tmp_path, mode, preset):
    """The credit modes that score window boundaries: the rollouts hand over each boundary's image
    (reward_gain: the predicted clean image, decoded; ode_gain: the boundary completed by ODE steps, at
    a cost the run records), the reward actor scores them, and the step credits the run records equal
    the reference computation of the same first epoch in this process (same prompts, noise, weights)."""
    from dense_rl.diffusion.pipeline import build_policy
    from dense_rl.rewards import WeightedRewards
    from dense_rl.training.prompts import load_prompts
    from dense_rl.training.scoring import score_trajectories
    from dense_rl.training.trainer import sample_epoch

    config = small_config(tmp_path, "run.name=gain", "run.num_epochs=2", "sample.num_steps=10",
                          f"credit.mode={mode}", "credit.window_size=5", preset=preset)
    history = run_system(config, f"{tmp_path}/gain", show_progress=False)
    assert len(history) == 2 and all(m["learner_optimizer_steps"] > 0 for m in history)
    # ODE completions from steps 0 and 5 of 10: 10 + 5 extra denoiser calls per sample; decodes: none.
    assert [m["credit_model_calls_per_sample"] for m in history] == [15.0 if mode == "ode_gain" else 0.0] * 2
    assert all(m["credit_seconds_per_sample"] > 0 for m in history)

    rows = RunDir(f"{tmp_path}/gain").read_table("samples/epoch-0000.parquet")
    credits = torch.tensor([row["step_credits"] for row in rows])
    assert credits.shape == (16, 10)
    torch.testing.assert_close(credits.sum(1), torch.ones(16))
    assert torch.equal(credits[:, :5], credits[:, :1].expand(-1, 5))  # one weight per window
    assert not torch.allclose(credits, torch.full_like(credits, 0.1))  # not uniform credit

    pipe, _ = build_policy(config)
    trajectories = sample_epoch(pipe, config, load_prompts(config.sample.prompts), epoch=0)
    reference = score_trajectories(WeightedRewards(config.rewards), trajectories.for_reward(), config.credit)
    torch.testing.assert_close(credits, reference.step_weights, atol=1e-5, rtol=1e-4)


def test_checkpoint_retention_keeps_the_newest_and_the_run_resumes_from_them(tmp_path):
    """checkpoint.keep: 2 (Ray Train's CheckpointConfig.num_to_keep): after 3 epochs the session holds its
    2 newest checkpoints, latest.json names the newest, and the run resumes from it."""
    # 5 steps: what is kept does not depend on the sampler, and the test runs Ray Train's start twice.
    config = small_config(tmp_path, "run.name=kept", "run.num_epochs=3", "checkpoint.keep=2", "sample.num_steps=5")
    run = RunDir(f"{tmp_path}/kept")
    run_system(config, run.uri, show_progress=False)
    (session,) = run.list_folders("checkpoints")
    assert [name for name in run.list_folders(f"checkpoints/{session}") if name.startswith("epoch-")] == [
        "epoch-0002", "epoch-0003"]
    assert run.latest_checkpoint() == {"epoch": 3, "path": f"checkpoints/{session}/epoch-0003"}

    history = run_system(dataclasses.replace(config, run=dataclasses.replace(config.run, num_epochs=4)), run.uri,
                         show_progress=False)
    assert [m["epoch"] for m in history] == [0, 1, 2, 3] and run.latest_checkpoint()["epoch"] == 4
    assert len(run.list_folders("checkpoints")) == 2  # the resumed session's own folder beside the first


def test_held_out_evaluation_and_a_stop_guard_through_ray(tmp_path):
    """The Ray system evaluates the base model and each new policy on the held-out set (rollout actors
    sample, reward actors score, with an unseen reward) and stops at once on a guard that trips: here
    one no policy can satisfy, so the run ends after its first evaluation, before its budget."""
    config = small_config(tmp_path, "run.name=guarded", "run.num_epochs=4", "sample.num_steps=5", "evaluation.every_epochs=1",
                          "evaluation.max_prompts=6", "evaluation.batch_size=4", "evaluation.rewards=[digit_alignment]",
                          "guards=[{metric: trained, min: 1000.0, action: stop}]")
    run = RunDir(f"{tmp_path}/guarded")
    history = run_system(config, run.uri, show_progress=False)
    assert len(history) == 1 and history[-1]["stopped_by"].startswith("guard guards[0] trained min 1000: ")
    rows = run.read_table("heldout.parquet")
    assert {(row["policy_version"], row["reward"]) for row in rows} >= {
        (0, "preference"), (0, "digit_alignment"), (0, "trained"), (1, "digit_alignment"), (1, "image_brightness")}
    samples = {row["policy_version"]: row["samples"] for row in rows}
    assert samples == {0: 0, 1: 16}
    assert run.exists("images/heldout-epoch-0000.png") and not run.exists("best.json")  # its only policy tripped
    record = run.read_json("registry.json")
    assert record["status"] == "stopped" and record["stopped_by"] == history[-1]["stopped_by"]
