"""The throughput benchmark's report code (ratios, learning per second, results.json, plot, table) on
synthetic measurements, since a real run spends minutes starting Ray; and what it measures without Ray
(LoRA sizes, object-store bytes of a rollout batch) on the real tiny model. No time is asserted."""

from __future__ import annotations

import math

import pytest
import torch

from dense_rl.bench import throughput
from dense_rl.bench.common import Report
from support.bench import REPO, assert_png, load_results

RAY_RATIOS = {
    "coca_over_sparse_epoch_time", "credit_compute_coca_share_of_epoch", "credit_compute_coca_over_sparse",
    "ray_sync_over_in_process_throughput", "async_over_sync_throughput",
    "broadcast_tiny_share_of_ray_epoch", "broadcast_sd15_share_of_tiny_ray_epoch",
    "async_over_sync_reward_gain_per_second",
}


def in_process_history(epoch_seconds: list[float]) -> list[dict]:
    """What loop.train returns per epoch, as far as the benchmark reads it."""
    return [{"epoch_seconds": s, "seconds_sample": 0.6 * s, "seconds_score": 0.1 * s,
             "seconds_advantages": 0.05 * s, "seconds_update": 0.25 * s} for s in epoch_seconds]


def ray_run(epoch_ends: list[float], reward_mean: list[float]) -> dict:
    """What ray_system returns for epochs ending at `epoch_ends` (seconds on the driver's clock)."""
    return {"epoch_seconds": [b - a for a, b in zip([epoch_ends[0] - 9.0, *epoch_ends], epoch_ends)],
            "between_epoch_ends": [b - a for a, b in zip(epoch_ends, epoch_ends[1:])],
            "seconds_sample_and_score": [1.0] * len(epoch_ends), "seconds_learn_and_sync": [0.5] * len(epoch_ends),
            "reward_mean": reward_mean, "seconds_at_epoch_end": [end - epoch_ends[0] for end in epoch_ends],
            "samples_per_epoch": 8}


def throughput_measurements(sync_rewards=(0.10, 0.30)) -> dict:
    """Synthetic results of `throughput --quick` (2 epochs of 8 samples per configuration), put
    through the benchmark's own summaries: round numbers, so every ratio is known in advance."""
    samples = 8
    fields = {"learner": {"latents": 9216.0, "prompt_embeds": 4096.0, "log_probs": 40.0},
              "reward": {"images": 768.0, "cosines": 40.0}}
    return {
        "in_process": {"sparse": throughput.in_process_summary(in_process_history([9.0, 2.0]), samples),
                       "coca": throughput.in_process_summary(in_process_history([9.5, 2.5]), samples)},
        "credit_compute_seconds": {"sparse": 0.001, "uniform": 0.0012, "coca": 0.002},
        "ray": {"sync": throughput.ray_summary(ray_run([100.0, 104.0], list(sync_rewards)), samples),
                "async": throughput.ray_summary(ray_run([100.0, 102.0], [0.10, 0.25]), samples)},
        "broadcast_and_bytes": {
            "tiny": {"seconds_median": 0.01, "seconds_min": 0.008, "put_seconds_median": 0.001, "workers": 2,
                     "bytes": 4 * 57344, "parameters": 57344, "tensors": 56},
            "sd15_rank4": {"seconds_median": 0.04, "seconds_min": 0.03, "put_seconds_median": 0.005, "workers": 2,
                           "bytes": 4 * 797184, "parameters": 797184, "tensors": 128},
            "object_store": {"batch_size": 8, "num_steps": 10, "latent_shape": [3, 16, 16], "image_shape": [3, 16, 16],
                             "bytes_per_trajectory": 23000.0, "learner_bytes_per_trajectory": 22000.0,
                             "reward_bytes_per_trajectory": 1000.0,
                             "field_bytes_per_trajectory": fields, "scored_batch_bytes_per_trajectory": 900.0},
        },
    }


def test_steady_drops_only_the_warm_up_value():
    assert throughput.steady([30.0, 2.0, 4.0, 3.0]) == 3.0
    assert throughput.steady([30.0, 2.0]) == 2.0
    assert throughput.steady([5.0]) == 5.0  # a single epoch is all there is


def test_reward_gain_counts_from_the_first_epoch_end():
    run = ray_run([100.0, 104.0, 108.0], [0.1, 0.2, 0.5])
    assert throughput.reward_gain(run) == pytest.approx(
        {"reward_gain": 0.4, "per_second": 0.4 / 8.0, "per_sample": 0.4 / 16})
    assert throughput._ratio(3.0, 2.0) == 1.5 and throughput._ratio(-1.0, 2.0) == -0.5
    assert math.isnan(throughput._ratio(1.0, 0.0)) and math.isnan(throughput._ratio(1.0, -0.1))


def test_ray_summary_reads_throughput_between_epoch_ends():
    run = throughput.ray_summary(ray_run([100.0, 103.0, 107.0], [0.1, 0.2, 0.3]), samples=8)
    assert run["steady_epoch_seconds"] == 3.5 and run["trajectories_per_second"] == 8 / 3.5
    single = throughput.ray_summary(ray_run([100.0], [0.1]), samples=8)  # no second end: the driver's epoch time
    assert single["steady_epoch_seconds"] == 9.0


def test_throughput_report_from_synthetic_measurements(tmp_path, capsys):
    report = Report("throughput", tmp_path, {"quick": True, "epochs": 2})
    returned = throughput.finish(report, throughput_measurements())
    assert returned == pytest.approx({
        "coca_over_sparse_epoch_time": 2.5 / 2.0, "credit_compute_coca_share_of_epoch": 0.002 / 2.5,
        "credit_compute_coca_over_sparse": 2.0, "ray_sync_over_in_process_throughput": (8 / 4.0) / (8 / 2.5),
        "async_over_sync_throughput": 2.0, "async_over_sync_reward_gain_per_second": (0.15 / 2.0) / (0.20 / 4.0),
        "broadcast_tiny_share_of_ray_epoch": 0.01 / 4.0, "broadcast_sd15_share_of_tiny_ray_epoch": 0.04 / 4.0,
    })
    results = load_results(tmp_path, "throughput")  # no null: every ratio was measurable
    assert set(results["ratios"]) == RAY_RATIOS
    assert results["ratios"] == pytest.approx(returned)  # results.json holds what finish computed
    for mode in ("sync", "async"):
        run = results["results"]["ray"][mode]
        assert len(run["reward_mean"]) == len(run["seconds_at_epoch_end"]) == 2
        assert run["learning"]["per_second"] == pytest.approx(
            (run["reward_mean"][1] - run["reward_mean"][0]) / run["seconds_at_epoch_end"][1])
    assert_png(tmp_path / "throughput.png")
    stdout = capsys.readouterr().out
    assert "Ray sync / in-process" in stdout and "async / sync" in stdout


def test_throughput_report_writes_null_when_sync_learned_nothing(tmp_path, capsys):
    report = Report("throughput", tmp_path, {"quick": True})
    ratios = throughput.finish(report, throughput_measurements(sync_rewards=(0.30, 0.30)))
    assert math.isnan(ratios["async_over_sync_reward_gain_per_second"])  # JSON has no NaN: null
    # That ratio alone: the sync run's zero gain leaves every other number measurable.
    results = load_results(tmp_path, "throughput", nulls_allowed=("ratios/async_over_sync_reward_gain_per_second",))
    assert results["ratios"]["async_over_sync_reward_gain_per_second"] is None


@pytest.fixture(scope="module")
def tiny_config():
    from dense_rl.config import load_config

    # 2 steps of 4 samples: enough for every field of a trajectory batch to exist.
    return load_config(REPO / "configs" / "tiny.yaml", ["sample.num_steps=2", "credit.window_size=2",
                                                       "sample.batch_size=4", "train.batch_size=4"])


@pytest.fixture(scope="module")
def tiny_pipe(tiny_config):
    from dense_rl.diffusion.pipeline import build_policy

    return build_policy(tiny_config)[0]


def test_lora_sizes_of_sd15_rank4_and_the_tiny_model(tiny_pipe):
    from dense_rl.diffusion.lora import lora_state_dict
    from dense_rl.diffusion.pipeline import denoiser

    sd15 = throughput.state_size(throughput.sd15_lora_state())
    # SD 1.5's attention projections with a rank-4 adapter: 797,184 float32 parameters (about 3.2 MB).
    assert sd15["parameters"] == 797184 and sd15["bytes"] == 4 * 797184
    tiny = throughput.state_size(lora_state_dict(denoiser(tiny_pipe)))  # what a RolloutWorker broadcasts
    # The adapter's trainable parameters, all of them and nothing frozen, in float32.
    trainable = [p for p in denoiser(tiny_pipe).parameters() if p.requires_grad]
    assert tiny["tensors"] == len(trainable) and tiny["parameters"] == sum(p.numel() for p in trainable)
    assert tiny["bytes"] == 4 * tiny["parameters"] and 0 < tiny["bytes"] < sd15["bytes"]


def test_object_store_bytes_of_a_real_rollout_batch(tiny_config, tiny_pipe, one_torch_thread):
    from dense_rl.diffusion.sampler import sample_trajectories
    from dense_rl.rewards import WeightedRewards
    from dense_rl.system.messages import ScoredBatch
    from dense_rl.training.recipe import sampler_options
    from dense_rl.training.scoring import score_trajectories

    prompts = ["a red digit seven"] * tiny_config.sample.batch_size
    trajectories = sample_trajectories(tiny_pipe, prompts, **sampler_options(tiny_config),
                                       generator=torch.Generator().manual_seed(0))
    learner_part, reward_part = trajectories.for_learner(), trajectories.for_reward()
    scores = score_trajectories(WeightedRewards(tiny_config.rewards), reward_part, tiny_config.credit)
    scored = ScoredBatch(prompts, 0, scores, reward_part.images[:8])
    store = throughput.object_store_bytes(learner_part, reward_part, scored)
    assert store["batch_size"] == 4 and store["num_steps"] == 2
    fields = store["field_bytes_per_trajectory"]
    assert store["learner_bytes_per_trajectory"] >= sum(fields["learner"].values())
    assert store["reward_bytes_per_trajectory"] >= sum(fields["reward"].values())
    # Each role's part holds what it reads and nothing else: no image for the learner, no latents
    # for the reward role, no predicted x0 sequence for either.
    assert {"latents", "log_probs", "prompt_embeds", "negative_prompt_embeds"} <= set(fields["learner"])
    assert set(fields["reward"]) == {"images", "cosines"}
    assert fields["reward"]["images"] == 3 * 16 * 16  # uint8
    assert fields["learner"]["negative_prompt_embeds"] * 4 == fields["learner"]["prompt_embeds"]  # once per batch of 4
    for sizes in fields.values():
        assert list(sizes.values()) == sorted(sizes.values(), reverse=True)  # largest first: the table names the top one
    # The driver gets scores and a preview back, not the trajectories.
    assert 0 < store["scored_batch_bytes_per_trajectory"] < store["bytes_per_trajectory"]
