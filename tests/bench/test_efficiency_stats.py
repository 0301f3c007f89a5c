"""The sample-efficiency benchmark's statistics and bookkeeping on fixed inputs with known answers:
crossing interpolation, bootstrap intervals, AUC, grid completeness, skipping runs already on disk and
merging parts. Fast: nothing is trained (fake run files stand in for runs)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dense_rl.bench import efficiency_stats as stats
from dense_rl.bench import sample_efficiency as se
from dense_rl.bench.efficiency_plots import plot_credit
from dense_rl.bench.efficiency_runs import METHODS, existing_runs, run_file, runs_to_do, write_json_atomic
from dense_rl.bench.efficiency_summary import grid_status, summarise

SAMPLES = np.array([0.0, 10.0, 20.0, 30.0, 40.0])


# ------------------------------------------------------------------------------------- crossings


def test_samples_to_reach_interpolates_between_epochs():
    samples, curve = [0, 10, 20, 30], [1.0, 2.0, 4.0, 4.0]
    assert stats.samples_to_reach(samples, curve, 3.0) == 15.0  # halfway from 2 (at 10) to 4 (at 20)
    assert stats.samples_to_reach(samples, curve, 2.5) == 12.5
    assert stats.samples_to_reach(samples, curve, 2.0) == 10.0  # reached exactly at an epoch
    assert stats.samples_to_reach(samples, curve, 0.5) == 0.0  # already there at the first point
    assert stats.samples_to_reach(samples, curve, 5.0) is None  # never within the budget


def test_first_crossings_agree_with_samples_to_reach():
    curves = np.array([[1.0, 2.0, 4.0, 4.0], [0.0, 0.0, 1.0, 3.0], [5.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    targets = np.array([3.0, 2.0, 4.0, 1.0])
    got = stats.first_crossings([0, 10, 20, 30], curves, targets)
    assert got[:3].tolist() == [15.0, 25.0, 0.0] and math.isnan(got[3])
    for curve, target, value in zip(curves, targets, got):
        expected = stats.samples_to_reach([0, 10, 20, 30], curve, target)
        assert (expected is None and math.isnan(value)) or expected == pytest.approx(value)


def test_smooth_is_a_trailing_mean():
    assert stats.smooth([1.0, 2.0, 3.0, 4.0], 2).tolist() == [1.0, 1.5, 2.5, 3.5]
    assert stats.smooth([1.0, 2.0, 3.0], 1).tolist() == [1.0, 2.0, 3.0]
    assert stats.smooth([[1.0, 2.0, 6.0], [3.0, 3.0, 3.0]], 5).tolist() == [[1.0, 1.5, 3.0], [3.0, 3.0, 3.0]]
    assert stats.smoothing_window(2) == 1 and stats.smoothing_window(16) == 4


# ------------------------------------------------------------------------------------- bootstrap


def test_bootstrap_collapses_when_every_seed_is_identical():
    ddpo = np.array([[0.0, 0.25, 0.5, 0.75, 1.0]] * 4)  # a straight line to DDPO's final reward 1.0
    method = np.array([[0.0, 0.5, 1.0, 1.0, 1.0]] * 4)  # there in half the samples
    ratios = stats.crossing_ratio(SAMPLES, ddpo, method, window=1, indices=stats.resample_indices(4, 200))
    assert set(ratios) == {"0.5", "0.75", "1"}
    # DDPO needs 20 / 30 / 40 samples for 50 / 75 / 100 % of its gain, the method 10 / 15 / 20.
    for key, (ddpo_samples, method_samples) in {"0.5": (20, 10), "0.75": (30, 15), "1": (40, 20)}.items():
        r = ratios[key]
        assert r["ddpo_samples"] == pytest.approx(ddpo_samples) and r["method_samples"] == pytest.approx(method_samples)
        assert r["value"] == pytest.approx(2.0) and r["ci_low"] == pytest.approx(2.0) and r["ci_high"] == pytest.approx(2.0)
        assert r["fraction_never"] == 0 and r["fraction_undefined"] == 0 and r["resamples"] == 200
    gain = stats.paired_gain(ddpo, method)
    assert gain["mean"] == pytest.approx(0.25) and gain["ci_low"] == pytest.approx(0.25) == gain["ci_high"]
    assert gain["per_epoch_mean"] == pytest.approx([0.0, 0.25, 0.5, 0.25, 0.0])
    assert gain["per_epoch_ci_low"] == pytest.approx(gain["per_epoch_mean"])
    held = stats.mean_interval([3.0, 3.0, 3.0])
    assert (held["mean"], held["ci_low"], held["ci_high"], held["std"]) == pytest.approx((3.0, 3.0, 3.0, 0.0))
    low, high = stats.curve_band(method)
    assert low == pytest.approx(method[0].tolist()) and high == pytest.approx(method[0].tolist())


def test_bootstrap_with_a_fixed_generator_on_a_tiny_case():
    # np.random.default_rng(0).integers(0, 3, size=(5, 3)) -- the resamples, by seed index:
    indices = stats.resample_indices(3, num_resamples=5, seed=0)
    assert indices.tolist() == [[2, 1, 1], [0, 0, 0], [0, 0, 0], [2, 1, 2], [1, 1, 2]]
    # Values 1, 2, 6 give resample means 10/3, 1, 1, 14/3, 10/3; sorted 1, 1, 10/3, 10/3, 14/3. numpy's
    # percentiles interpolate between order statistics at 0.025 * 4 = 0.1 and 0.975 * 4 = 3.9:
    # 1 + 0.1 * 0 = 1 and 10/3 + 0.9 * (14/3 - 10/3) = 4.5333...
    result = stats.mean_interval([1.0, 2.0, 6.0], indices)
    assert result["mean"] == 3.0
    assert result["ci_low"] == pytest.approx(1.0) and result["ci_high"] == pytest.approx(10 / 3 + 1.2)
    # Without indices the resamples come from the fixed default seed: the same interval every call. Three
    # values give too few distinct resample means to tell seeds apart; eight continuous ones do.
    values = np.random.default_rng(1).normal(size=8)
    assert stats.mean_interval(values) == stats.mean_interval(values)
    assert stats.mean_interval(values) != stats.mean_interval(values, stats.resample_indices(8, seed=1))


def test_crossing_ratio_counts_resamples_that_never_cross_as_zero():
    samples = np.array([0.0, 10.0, 20.0])
    ddpo = np.array([[0.0, 0.5, 1.0], [0.0, 0.5, 1.0]])  # reaches its final 1.0 at 20 samples
    method = np.array([[0.0, 1.0, 1.0],   # seed 0: there at 10 samples
                       [0.0, 0.0, 0.0]])  # seed 1: never
    indices = np.array([[0, 0], [1, 1], [0, 1], [1, 0]])
    r = stats.crossing_ratio(samples, ddpo, method, window=1, indices=indices, fractions=(1.0,))["1"]
    # Resample means of the method: [0,1,1] -> 20/10 = 2; [0,0,0] -> never; [0,.5,.5] twice -> never.
    # Ratios 2, 0, 0, 0: 2.5th percentile 0, 97.5th at position 2.925 -> 0 + 0.925 * 2 = 1.85.
    assert r["fraction_never"] == 0.75 and r["fraction_undefined"] == 0.0
    assert r["ci_low"] == 0.0 and r["ci_high"] == pytest.approx(1.85)
    assert r["value"] == 0.0 and r["method_samples"] is None and r["ddpo_samples"] == 20.0  # all seeds: never


def test_crossing_ratio_is_undefined_when_ddpo_did_not_improve():
    flat = np.array([[1.0, 0.9, 0.8]] * 3)
    r = stats.crossing_ratio([0, 10, 20], flat, flat + 0.1 * np.arange(3), window=1, indices=np.zeros((4, 3), int))
    assert all(v["value"] is None and v["ci_low"] is None and v["fraction_undefined"] == 1.0 for v in r.values())


def test_auc_of_a_straight_line_is_its_mean():
    samples = [0, 8, 16, 24]
    line = [1.0, 1.5, 2.0, 2.5]
    assert stats.auc(samples, line) == pytest.approx(1.75)  # (1 + 2.5) / 2
    assert stats.auc(samples, [3.0] * 4) == pytest.approx(3.0)
    assert stats.auc(samples, np.array([line, [3.0] * 4])) == pytest.approx([1.75, 3.0])
    summary = stats.auc_summary(samples, np.array([line, line]), ddpo=np.array([[1.0] * 4] * 2))
    assert summary["mean"] == pytest.approx(1.75) and summary["ci_low"] == pytest.approx(1.75)
    assert summary["gain_over_ddpo"]["mean"] == pytest.approx(0.75)


# ------------------------------------------------------------------------------------- grid and run files

SETTINGS = {"config": "configs/tiny.yaml", "overrides": [], "epochs": 4, "samples_per_epoch": 8, "num_steps": 10,
            "window_size": 5, "heldout": "embedded:tiny_heldout", "heldout_prompts": 12,
            "unseen_reward": "digit_alignment", "eval_seed": 1234, "quick": True}


def fake_run(reward: str, method: str, seed: int, settings=SETTINGS, profile: bool = True) -> dict:
    """A run file as execute_run writes it: the dense methods learn a little faster."""
    speed = {"ddpo": 0.1, "uca": 0.12, "coca": 0.2, "reward_gain": 0.18}[method]
    epochs = settings["epochs"]
    curve = [1.0 + 0.01 * seed + speed * e for e in range(epochs)]
    run = {"format": 1, "reward": reward, "method": method, "credit_mode": METHODS[method], "seed": seed,
           "settings": settings, "reward_mean": curve, "reward_std": [0.1] * epochs, "epoch_seconds": [1.0] * epochs,
           "seconds_score": [0.01] * epochs, "heldout": {reward: curve[-1], "digit_alignment": 0.96},
           "cosine_mean_per_step": [[0.8 + 0.02 * t for t in range(10)]] * epochs if profile else None,
           "step_weight_mean_per_step": None, "step_weight_std_per_step": None}
    if profile and method != "ddpo":
        weights = [0.1] * 10 if method == "uca" else [0.15] * 5 + [0.05] * 5
        run["step_weight_mean_per_step"] = [weights] * epochs
        run["step_weight_std_per_step"] = [[0.01] * 10] * epochs
    return run


def write_part(folder, keys, settings=SETTINGS) -> None:
    for key in keys:
        write_json_atomic(run_file(folder / "runs", key), fake_run(*key, settings=settings))
    write_json_atomic(folder / "base_heldout.json", {"settings": settings, "scores": {
        "preference": 1.0, "jpeg_compressibility": 1.0, "digit_alignment": 0.96}})


def test_grid_status_names_the_missing_runs():
    grid = se.plan_grid(["preference", "jpeg_compressibility"], ["ddpo", "coca"], [0, 1])
    assert len(grid) == 8 and grid[0] == ("preference", "ddpo", 0) and grid[4][2] == 1  # seeds outermost
    present = set(grid[:5]) | {("preference", "uca", 0)}
    status = grid_status(grid, present)
    assert status["complete"] is False and status["expected_runs"] == 8 and status["present_runs"] == 5
    assert status["missing"] == [{"reward": "preference", "method": "coca", "seed": 1},
                                 {"reward": "jpeg_compressibility", "method": "ddpo", "seed": 1},
                                 {"reward": "jpeg_compressibility", "method": "coca", "seed": 1}]
    assert status["extra_runs_ignored"] == 1
    assert grid_status(grid, grid) == {"complete": True, "expected_runs": 8, "present_runs": 8, "missing": [],
                                          "extra_runs_ignored": 0}


def test_runs_on_disk_are_skipped_and_other_settings_refused(tmp_path):
    grid = se.plan_grid(["preference"], ["ddpo", "coca"], [0, 1, 2])
    write_part(tmp_path, grid[:3])
    assert not list((tmp_path / "runs").glob(".*.tmp"))  # written by tmp file + rename: none left over
    (tmp_path / "runs" / ".preference__ddpo__seed2.json.999.tmp").write_text("{half a fi")  # a writer cut short
    existing = existing_runs(tmp_path / "runs", SETTINGS)
    assert set(existing) == set(grid[:3]) and existing[grid[0]]["reward_mean"][0] == 1.0
    assert runs_to_do(grid, existing) == grid[3:]
    assert runs_to_do(grid, {}) == grid

    with pytest.raises(SystemExit, match=r"seed0\.json was run with epochs=4 \(this command: 6\)"):
        existing_runs(tmp_path / "runs", {**SETTINGS, "epochs": 6})
    (tmp_path / "runs" / "preference__coca__seed9.json").write_text("{not json")
    with pytest.raises(SystemExit, match="seed9.json: not a readable run file"):
        existing_runs(tmp_path / "runs", SETTINGS)


def test_merge_two_parts_into_a_complete_grid(tmp_path, capsys):
    rewards, methods = ["preference", "jpeg_compressibility"], ["ddpo", "uca", "coca", "reward_gain"]
    grid = se.plan_grid(rewards, methods, [0, 1, 2])
    write_part(tmp_path / "a", [key for key in grid if key[2] < 2])
    write_part(tmp_path / "b", [key for key in grid if key[2] == 2])
    out = tmp_path / "merged"
    # One part as its --out folder, the other as its runs/ folder.
    assert se.main(["--merge", str(tmp_path / "a"), str(tmp_path / "b" / "runs"), "--out", str(out),
                    "--num-resamples", "200"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] is True and results["settings"]["seeds"] == [0, 1, 2]
    assert results["settings"]["rewards"] == rewards and list(results["settings"]["methods"]) == methods
    summary = results["summary"]
    assert summary["grid"]["complete"] is True and summary["grid"]["expected_runs"] == 24
    assert len(list((out / "runs").glob("*.json"))) == 24  # copied: the same command can resume there
    for reward in rewards:
        s = summary["rewards"][reward]
        assert s["seeds_paired"] == [0, 1, 2] and set(s["methods"]) == set(methods)
        coca = s["methods"]["coca"]
        # Straight lines from the same start: CoCA gains 0.2 an epoch, DDPO 0.1, so CoCA needs half the samples.
        assert coca["ratio_vs_ddpo"]["1"]["value"] == pytest.approx(2.0, rel=0.02)
        assert coca["paired_gain_over_ddpo"]["mean"] == pytest.approx(0.1 * 2)  # mean of 0.1, 0.2, 0.3
        assert coca["heldout"][reward]["mean"] > s["methods"]["ddpo"]["heldout"][reward]["mean"]
        assert coca["credit_profile"]["step_weight_mean_per_step"] == pytest.approx([0.15] * 5 + [0.05] * 5)
        assert "credit_profile" in s["methods"]["ddpo"]  # cosines only
        assert "step_weight_mean_per_step" not in s["methods"]["ddpo"]["credit_profile"]
    for name in ("reward_vs_samples.png", "heldout.png", "step_weights.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    stdout = capsys.readouterr().out
    assert "grid complete: 24 runs" in stdout and "DDPO/method samples to 100%" in stdout


def test_merge_reports_a_partial_grid_and_refuses_other_settings(tmp_path, capsys):
    grid = se.plan_grid(["preference"], ["ddpo", "coca"], [0, 1])
    write_part(tmp_path / "a", [grid[0], grid[1], grid[2]])  # coca seed 1 missing
    assert se.main(["--merge", str(tmp_path / "a"), "--out", str(tmp_path / "m"), "--num-resamples", "50"]) == 0
    summary = json.loads((tmp_path / "m" / "results.json").read_text())["summary"]
    assert summary["grid"]["complete"] is False
    assert summary["grid"]["missing"] == [{"reward": "preference", "method": "coca", "seed": 1}]
    assert summary["rewards"]["preference"]["seeds_paired"] == [0]  # only seeds every method finished pair
    assert "grid INCOMPLETE: 3 of 4 runs; missing: preference/coca/seed1" in capsys.readouterr().out

    write_part(tmp_path / "b", [grid[3]], settings={**SETTINGS, "num_steps": 20})
    with pytest.raises(SystemExit, match="num_steps=20"):
        se.main(["--merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m2")])


def test_credit_plot_is_skipped_without_a_credit_profile(tmp_path):
    grid = se.plan_grid(["preference"], ["ddpo", "coca"], [0, 1])
    runs = [fake_run(*key, profile=False) for key in grid]
    summary = summarise(runs, grid, SETTINGS, num_resamples=50)
    assert all("credit_profile" not in m for m in summary["rewards"]["preference"]["methods"].values())
    assert plot_credit(summary, tmp_path / "step_weights.png") is False
    assert not (tmp_path / "step_weights.png").exists()


def test_methods_default_to_all_four_and_an_unknown_one_is_a_one_line_error():
    assert se.selection(se.parse_args([]))[1] == ["ddpo", "uca", "coca", "reward_gain"]
    assert se.selection(se.parse_args(["--methods", "coca, ddpo"]))[1] == ["coca", "ddpo"]
    with pytest.raises(SystemExit, match=r"^--methods: unknown method 'dpo'; choose from ddpo, uca, coca, reward_gain$"):
        se.selection(se.parse_args(["--methods", "ddpo,dpo"]))
