"""The benchmark command lists its benchmarks, and `sample-efficiency --quick` runs end to end: its
results.json is complete (finite numbers, null only where a test expects no value), with plots and a
table, and a second run resumes from the run files without rewriting them. No time is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from support.bench import REPO, assert_png, load_results, run_bench


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
