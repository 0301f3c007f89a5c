"""The benchmarks' output is well-formed (results.json with finite numbers and null only where a test
expects no value, PNG plots, a printed table).
`sample-efficiency --quick` runs end to end; throughput and scaling spend minutes starting Ray, so
their report code (ratios, cost model, results.json, plot, table) is fed synthetic measurements here,
and what they measure without Ray (LoRA sizes, object-store bytes) runs on the real tiny model.
No time is asserted."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dense_rl.bench import scaling, throughput
from dense_rl.bench.common import Report

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_bench(*args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "dense_rl.bench", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def numbers(value):
    """Every number anywhere in a JSON value."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from numbers(v)


def null_paths(value, path: str = ""):
    """The path ("a/b/0") of every null anywhere in a JSON value."""
    if value is None:
        yield path
    elif isinstance(value, dict):
        for key, v in value.items():
            yield from null_paths(v, f"{path}/{key}" if path else str(key))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from null_paths(v, f"{path}/{i}" if path else str(i))


def matches(path: str, pattern: str) -> bool:
    """Whether a null_paths path matches `pattern`, in which * stands for one path component."""
    return re.fullmatch("[^/]*".join(map(re.escape, pattern.split("*"))), path) is not None


def load_results(out: Path, name: str, nulls_allowed: tuple[str, ...] = ()) -> dict:
    """results.json, complete. Report.save writes every NaN or inf as null, so finite numbers alone
    prove nothing: every null must match one of `nulls_allowed` (patterns of null_paths, see
    `matches`), the fields the test expects may have no value."""
    results = json.loads((out / "results.json").read_text())
    assert results["benchmark"] == name and results["complete"] is True
    assert results["settings"]["quick"] is True
    assert len(results["load_average_start"]) == 3 and results["machine"]["cores"] == os.cpu_count()
    assert all(math.isfinite(x) for x in numbers(results))
    unexpected = [path for path in null_paths(results) if not any(matches(path, allowed) for allowed in nulls_allowed)]
    assert unexpected == [], f"null (a NaN or inf when measured) in {unexpected}"
    return results


def assert_png(path: Path, size: tuple[int, int] | None = None) -> None:
    """A PNG image: a plot (more than a few kB), or an image grid of exactly `size` (width, height)."""
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC), path
    if size is None:
        assert len(data) > 5000, path
    else:
        from PIL import Image

        assert Image.open(path).size == size, path


def test_bench_lists_benchmarks_and_rejects_unknown_names():
    listing = subprocess.run([sys.executable, "-m", "dense_rl.bench"], cwd=REPO, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    assert listing.returncode == 0
    assert all(name in listing.stdout for name in ("sample-efficiency", "throughput", "scaling"))
    unknown = subprocess.run([sys.executable, "-m", "dense_rl.bench", "speed"], cwd=REPO, capture_output=True,
                             text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert unknown.returncode == 2 and "unknown benchmark 'speed'" in unknown.stderr


@pytest.mark.slow
def test_sample_efficiency_quick(tmp_path):
    methods = {"ddpo", "uca", "coca", "reward_gain"}
    result = run_bench("sample-efficiency", "--quick", "--out", str(tmp_path))
    # What may have no value in a short run: a crossing a method never reaches, a ratio (and its
    # interval) that is undefined, and the step weights of DDPO, which has none (checked below).
    method = "summary/rewards/preference/methods/*"
    results = load_results(tmp_path, "sample-efficiency", nulls_allowed=(
        f"{method}/samples_to_reach/*", f"{method}/ratio_vs_ddpo/*/value", f"{method}/ratio_vs_ddpo/*/ci_low",
        f"{method}/ratio_vs_ddpo/*/ci_high", f"{method}/ratio_vs_ddpo/*/method_samples",
        "runs/*/step_weight_mean_per_step", "runs/*/step_weight_std_per_step"))
    assert all((run["step_weight_mean_per_step"] is None) == (run["method"] == "ddpo") for run in results["runs"])
    settings, summary = results["settings"], results["summary"]
    grid = {("preference", m, s) for m in methods for s in (0, 1)}
    assert {(r["reward"], r["method"], r["seed"]) for r in results["runs"]} == grid
    # One file per run, as each finished; the grid is complete.
    assert {p.name for p in (tmp_path / "runs").glob("*.json")} == {f"{r}__{m}__seed{s}.json" for r, m, s in grid}
    # Each with its final policy's held-out samples (12 prompts, six colours a row), and the base model's.
    for r, m, s in grid:
        assert_png(tmp_path / "runs" / f"{r}__{m}__seed{s}.png", size=(6 * 33 - 1, 2 * 33 - 1))
    assert_png(tmp_path / "base_heldout.png", size=(6 * 33 - 1, 2 * 33 - 1))
    assert_png(tmp_path / "samples.png")
    assert summary["grid"]["complete"] is True and summary["grid"]["missing"] == []
    assert set(summary["rewards"]) == {"preference"}
    sweep = summary["rewards"]["preference"]
    assert set(sweep["methods"]) == methods and sweep["seeds_paired"] == [0, 1]
    for name, method in sweep["methods"].items():
        assert method["seeds"] == 2 and len(method["curve_mean"]) == settings["epochs"] == len(method["curve_ci_low"])
        assert set(method["heldout"]) == {"preference", "digit_alignment"}
        assert {"mean", "ci_low", "ci_high"} <= set(method["auc"]) and method["median_epoch_seconds"] > 0
        if name != "ddpo":
            assert set(method["ratio_vs_ddpo"]) == {"0.5", "0.75", "1"}
            assert {"mean", "ci_low", "ci_high", "per_epoch_mean"} <= set(method["paired_gain_over_ddpo"])
    # Same seeds, same first batch: the methods differ only after their first update.
    first = [s["curve_mean"][0] for s in sweep["methods"].values()]
    assert max(first) - min(first) < 1e-5
    # Two code paths to one crossing: the summary's samples_to_reach on the smoothed mean curve, and
    # crossing_ratio's point estimate (first_crossings). They must agree, for DDPO's crossing too, and
    # a ratio is missing exactly when it is undefined: DDPO did not improve, or a curve starts at the target.
    start = summary["samples"][0]
    for name, method in sweep["methods"].items():
        if name == "ddpo":
            continue
        for f, ratio in method["ratio_vs_ddpo"].items():
            assert ratio["target"] == pytest.approx(sweep["targets"][f])
            assert ratio["method_samples"] == pytest.approx(method["samples_to_reach"][f]), (name, f)
            assert ratio["ddpo_samples"] == pytest.approx(sweep["methods"]["ddpo"]["samples_to_reach"][f]), (name, f)
            undefined = (sweep["ddpo_final_reward"] <= sweep["ddpo_first_reward"] or ratio["ddpo_samples"] <= start
                         or (ratio["method_samples"] is not None and ratio["method_samples"] <= start))
            assert (ratio["value"] is None) == undefined, (name, f)
    assert_png(tmp_path / "reward_vs_samples.png")
    assert_png(tmp_path / "heldout.png")
    if any(r.get("cosine_mean_per_step") or r.get("step_weight_mean_per_step") for r in results["runs"]):
        assert_png(tmp_path / "step_weights.png")
    assert "| method" in result.stdout and "DDPO/method samples to 100%" in result.stdout
    assert "grid complete" in result.stdout
    # The same command again finds every run on disk and trains nothing: it only reads the run files
    # (and the cached base-model scores) back, so none of them is rewritten.
    files = [*(tmp_path / "runs").glob("*.json"), tmp_path / "base_heldout.json"]
    written = {path: path.stat().st_mtime_ns for path in files}
    again = run_bench("sample-efficiency", "--quick", "--out", str(tmp_path))
    assert f"{len(grid)} already in" in again.stderr and "0 to run" in again.stderr
    assert {path: path.stat().st_mtime_ns for path in files} == written
    assert json.loads((tmp_path / "results.json").read_text())["summary"]["rewards"] == summary["rewards"]


# ---------------------------------------------------------------------------------------- throughput

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


# ---------------------------------------------------------------------------------------- scaling

A, B, C, SAMPLES = 6.0, 0.5, 1.5, 8  # rollout work shared by N, fixed sampling part, learn + sync


def scaling_measurement(n: int) -> dict:
    """What `measure` gives for N actors on a machine that follows T(N) = A/N + B + C exactly, from
    2 epochs of driver metrics (the first one slower: actor start-up)."""
    epoch = {"epoch_seconds": A / n + B + C, "seconds_sample_and_score": A / n + B, "seconds_learn_and_sync": C}
    warm_up = {key: 10 * value for key, value in epoch.items()}
    return scaling.steady_timings([warm_up, epoch], [50.0, 50.0 + A / n + B + C], SAMPLES)


def test_steady_timings_skip_the_start_up_epoch():
    measured = scaling_measurement(2)
    assert measured["sample_and_score"] == A / 2 + B and measured["learn_and_sync"] == C
    assert measured["steady_epoch_seconds"] == pytest.approx(A / 2 + B + C)  # between the two epoch ends
    assert measured["trajectories_per_second"] == pytest.approx(SAMPLES / (A / 2 + B + C))


def test_cost_model_recovers_the_terms_it_was_generated_from():
    actors = [1, 2, 4]
    model = scaling.cost_model(actors, {n: scaling_measurement(n) for n in actors}, SAMPLES)
    assert model["a_rollout_seconds"] == pytest.approx(A) and model["b_fixed_sample_seconds"] == pytest.approx(B)
    assert model["c_learn_and_sync_seconds"] == C
    assert model["predicted_trajectories_per_second"][64] == pytest.approx(SAMPLES / (A / 64 + B + C))
    assert model["limit_trajectories_per_second"] == pytest.approx(SAMPLES / (B + C))
    assert model["half_of_limit_at_n"] == pytest.approx(A / (B + C))


def test_cost_model_clips_rollouts_that_did_not_speed_up():
    # Two actors sharing one core: sample+score grew with N, so a/N + b fits a < 0; a is clipped to 0.
    measured = {1: {"sample_and_score": 4.0, "learn_and_sync": 1.0}, 2: {"sample_and_score": 5.0, "learn_and_sync": 1.0}}
    model = scaling.cost_model([1, 2], measured, SAMPLES)
    assert model["a_rollout_seconds"] == 0.0 and model["b_fixed_sample_seconds"] == pytest.approx(6.0)
    assert all(v == pytest.approx(SAMPLES / 7.0) for v in model["predicted_trajectories_per_second"].values())
    # One count measured: everything is rollout work, nothing fixed.
    single = scaling.cost_model([1], {1: measured[1]}, SAMPLES)
    assert single["a_rollout_seconds"] == 4.0 and single["b_fixed_sample_seconds"] == 0.0


def test_scaling_report_from_synthetic_measurements(tmp_path, capsys):
    report = Report("scaling", tmp_path, {"quick": True, "actors": [1, 2]})
    scaling.finish(report, [1, 2], {n: scaling_measurement(n) for n in (1, 2)}, SAMPLES)
    results = load_results(tmp_path, "scaling")
    assert set(results["measured"]) == {"1", "2"}
    assert results["speedup"]["2"] == pytest.approx((A + B + C) / (A / 2 + B + C))
    model = results["cost_model"]
    assert set(model["predicted_trajectories_per_second"]) == {"1", "2", "4", "8", "16", "32", "64"}
    predicted = [model["predicted_trajectories_per_second"][n] for n in ("1", "2", "4", "8", "16", "32", "64")]
    assert predicted == sorted(predicted)  # more actors never predicts less throughput
    assert "T(N) = a/N + b + c" in (tmp_path / "cost_model.md").read_text()
    assert_png(tmp_path / "scaling.png")
    assert "| rollout actors" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------- peer

# What ../shared/peer/floor_bench.py prints for 3 epochs, each line with the time it was read.
FLOOR_OUTPUT = [
    (110.0, "epoch 0: wall=10.00 sample=6.00 reward=0.10 train=3.90 reward_mean=-1.2"),
    (114.0, "epoch 1: wall=4.00 sample=2.40 reward=0.10 train=1.50 reward_mean=-1.1"),
    (120.0, "epoch 2: wall=6.00 sample=3.40 reward=0.10 train=2.50 reward_mean=-1.0"),
    (120.5, json.dumps({"impl": "plain-pytorch floor", "samples_per_epoch": 32, "epoch_s": [10.0, 4.0, 6.0],
                        "sample_s_per_epoch": 2.9, "reward_s_per_epoch": 0.1, "train_s_per_epoch": 2.0,
                        "other_s_per_epoch": 0.0, "reward_mean_per_epoch": [-1.2, -1.1, -1.0]})),
]


def test_peer_script_output_is_read_as_the_peer_counts_it():
    from dense_rl.bench.peer import parse_peer_output

    result = parse_peer_output(FLOOR_OUTPUT, started=100.0)
    assert result["trajectories_per_second"] == pytest.approx(32 / 5.0)  # epochs 2..N: (4 + 6) / 2
    assert result["first_epoch_end_seconds"] == pytest.approx(10.0)  # "epoch 0:" read at 110, started at 100
    assert result["steady_epoch_seconds"] == pytest.approx(5.0)
    assert result["sample_seconds"] == [3.0] * 3 and result["learn_seconds"] == [2.0] * 3


def test_peer_summary_takes_medians_over_repeats_and_ratios_of_rates():
    from dense_rl.bench.peer import epoch_summary, summarise

    def run(steady: float, first: float) -> dict:
        return epoch_summary([first, steady, steady], first, [1.0] * 3, [2.0] * 3, [0.0] * 3, 32)

    runs = {"in-process": [run(4.0, 9.0), run(5.0, 10.0), run(8.0, 30.0)], "ray-sync": [run(4.0, 40.0)],
            "floor": [run(8.0, 12.0)]}
    summary = summarise(runs)
    assert summary["setups"]["in-process"]["trajectories_per_second"] == pytest.approx(32 / 5.0)
    assert summary["setups"]["in-process"]["first_epoch_end_seconds"] == 10.0 and summary["setups"]["in-process"]["repeats"] == 3
    assert summary["ratios"] == pytest.approx({"ray-sync / in-process": 8.0 / 6.4, "in-process / floor": 6.4 / 4.0})


def test_peer_quick_in_process_on_an_sd_shaped_folder(tiny_sd_dir, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_sd_dir, model)
    (model / "prompts.txt").write_text("cat\ndog\nhorse\n")
    result = run_bench("peer", "--model", str(model), "--quick", "--setups", "in-process", "--out", str(tmp_path / "out"))
    results = load_results(tmp_path / "out", "peer")
    (only,) = results["runs"]["in-process"]
    assert len(only["epoch_seconds"]) == 2 and only["trajectories_per_second"] > 0 and len(only["reward_mean"]) == 2
    assert results["summary"]["setups"]["in-process"]["repeats"] == 1
    assert "| in-process" in result.stdout
    missing = subprocess.run([sys.executable, "-m", "dense_rl.bench", "peer", "--model", str(tmp_path)], cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert missing.returncode == 2 and "no model_index.json" in missing.stderr


@pytest.mark.slow
def test_learner_start_brings_up_both_groups_and_names_their_processes(tmp_path):
    """One repeat of each variant, each on a fresh private Ray instance: both groups of 2 ranks get
    ready (imports, the tiny policy, one all-reduce over gloo), and the processes seen are Ray Train's
    controller besides its workers, and the plain actors alone."""
    result = run_bench("learner-start", "--repeats", "1", "--settle-seconds", "0", "--out", str(tmp_path))
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["benchmark"] == "learner-start" and data["complete"] is True
    rows = {row["variant"]: row for row in data["rows"]}
    assert set(rows) == {"ray-train", "plain-actors"}
    assert all(row["seconds_to_ready"] > 0 and row["cpu_seconds"] > 0 for row in rows.values())
    assert "ray::TrainController.run" in rows["ray-train"]["worker_names"]
    assert rows["ray-train"]["worker_names"].count("ray::RayTrainWorker") == 2
    assert rows["plain-actors"]["worker_names"].count("ray::Rank.ready") == 2
    assert not any("Train" in name for name in rows["plain-actors"]["worker_names"])
    assert "Ray Train's group of 2 ranks is ready" in result.stdout
