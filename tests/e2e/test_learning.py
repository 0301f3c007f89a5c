"""Learning on the embedded models: short CoCA runs beat the base model on held-out prompts, async
learns as well per sample as sync (and decoupled PPO is what lets it), and the flow model learns
through the Ray system."""

import pytest
import torch

from dense_rl.config import load_config
from dense_rl.diffusion.pipeline import build_policy
from dense_rl.rewards import WeightedRewards
from dense_rl.training.prompts import load_prompts
from dense_rl.training.trainer import evaluate, train

pytestmark = pytest.mark.slow


def run_config(lag: int, seed: int):
    """The tiny preset (CoCA, the preference reward) for 6 epochs of 32 samples at 10 steps."""
    overrides = ["run.num_epochs=6", "sample.num_steps=10", f"run.seed={seed}", f"cluster.max_policy_lag={lag}"]
    return load_config("configs/tiny.yaml", overrides)


def heldout_reward(pipe, config) -> float:
    """The training reward's mean over one fixed-seed sample per held-out prompt (a caption template
    no training prompt uses)."""
    rewards, prompts = WeightedRewards(config.rewards), load_prompts("embedded:tiny_heldout")
    return evaluate(pipe, config, rewards, prompts, seed=1234)["reward"]


def run_in_process(lag: int, seed: int, decoupled: bool = True) -> tuple[list[dict], float]:
    """One in-process run (a process of its own, one torch thread): its metrics per epoch and its final
    policy's held-out reward. `decoupled=False` trains stale batches as plain PPO against the
    sampler's log-probs (the correction switched off, to show what it does)."""
    import functools

    from dense_rl.training import update

    torch.set_num_threads(1)
    if not decoupled:
        update.ppo_update = functools.partial(update.ppo_update, decoupled=False)
    config, trained = run_config(lag, seed), {}
    history = train(config, show_progress=False, keep_policy=trained)
    return history, heldout_reward(trained["pipe"], config)


def test_coca_beats_the_base_model_and_async_learns_as_well_per_sample_as_sync():
    """Seven short CoCA runs at the same sample budget: sync and async (max_policy_lag 1) on 3 seeds each,
    and one async run with decoupled PPO's correction switched off.

    - Every sync run's final policy scores more than 0.5 above the base model (every run's start: its
      LoRA is zero) on held-out prompts.
    - Async (each batch sampled one version behind the learner, as the Ray driver's async mode does):
      its reward curve stays within the seeds' spread of sync's.
    - The correction does its job: in every off-policy update the importance weight exp(proximal -
      behaviour) spreads on both sides of 1 (exactly 1 on-policy), and without the correction the same
      run is measurably more clipped (its ratio is taken against the stale log-probs: already clipped
      at the first optimizer step, where the corrected ratio starts at 1).

    The runs go two at a time, one thread each: on 2 cores that is 1.3x faster than one after the
    other with two threads."""
    import multiprocessing
    import statistics
    from concurrent.futures import ProcessPoolExecutor

    runs = [(lag, seed, True) for lag in (0, 1) for seed in (0, 1, 2)] + [(1, 0, False)]
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = dict(zip(runs, pool.map(run_in_process, *zip(*runs))))
    histories = {run: history for run, (history, _) in results.items()}
    for (lag, _, _), history in histories.items():
        assert [m["learner_off_policy"] for m in history] == [float(lag == 1 and epoch > 0) for epoch in range(6)]

    base_config = run_config(0, 0)
    base = heldout_reward(build_policy(base_config)[0], base_config)
    tuned = [results[0, seed, True][1] for seed in (0, 1, 2)]
    print(f"held-out preference: base {base:.3f}, sync runs after 192 samples {[round(t, 3) for t in tuned]}")
    assert all(t > base + 0.5 for t in tuned)

    def late_reward(lag, seed):  # the curve's second half: where learning shows
        return statistics.mean(m["reward_mean"] for m in histories[lag, seed, True][3:])

    sync = [late_reward(0, s) for s in (0, 1, 2)]
    lagged = [late_reward(1, s) for s in (0, 1, 2)]
    spread = max(statistics.stdev(sync), 0.05)
    print(f"late reward sync {sync} async {lagged}")
    assert statistics.mean(lagged) >= statistics.mean(sync) - 2 * spread
    assert min(history[-1]["reward_mean"] - history[0]["reward_mean"] for history in histories.values()) > 0

    for seed in (0, 1, 2):
        for m in histories[1, seed, True][1:]:
            assert m["learner_importance_weight_min"] < 1 < m["learner_importance_weight_max"]
        for m in histories[0, seed, True]:
            assert m["learner_importance_weight_min"] == m["learner_importance_weight_max"] == 1.0

    def clipped(history, key="learner_clipfrac"):  # over the off-policy epochs
        return statistics.mean(m[key] for m in history[1:])

    corrected, uncorrected = histories[1, 0, True], histories[1, 0, False]
    print(f"async clip fraction: corrected {clipped(corrected):.3f}, uncorrected {clipped(uncorrected):.3f}; "
          f"after the first step {clipped(corrected, 'learner_later_steps_clipfrac'):.3f} and "
          f"{clipped(uncorrected, 'learner_later_steps_clipfrac'):.3f}; sync {clipped(histories[0, 0, True]):.3f}")
    assert clipped(uncorrected) > 1.5 * clipped(corrected)
    assert all(m["learner_first_step_clipfrac"] > 0.05 for m in uncorrected[1:])
    assert clipped(uncorrected, "learner_later_steps_clipfrac") > clipped(corrected, "learner_later_steps_clipfrac")


def test_flow_model_learns_through_the_ray_system(tmp_path):
    """The command a user runs, `python -m dense_rl.launch --config configs/tiny-flow.yaml`: the
    embedded flow-matching model (flow SDE, GRPO group advantages, CoCA) on a private Ray instance,
    12 epochs of 32 samples. In-process the same config goes 4.8 -> 6.9."""
    import subprocess
    import sys

    from dense_rl.run.storage import RunDir

    command = [sys.executable, "-m", "dense_rl.launch", "--config", "configs/tiny-flow.yaml", "--quiet",
               "--set", f"run.output_dir={tmp_path}", "--set", "run.name=flow", "--set", "cluster.address=local"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=1500)
    assert finished.returncode == 0, finished.stderr[-3000:]
    rewards = [row["reward_mean"] for row in RunDir(f"{tmp_path}/flow").read_table("metrics.parquet")]
    print(f"tiny-flow training reward by epoch: {[round(r, 2) for r in rewards]}")
    assert len(rewards) == 12
    assert sum(rewards[-3:]) / 3 > rewards[0] + 1.0, rewards
