"""The credit comparison's pieces: the guarded statistics on known curves, the learning-rate sweep that
widens until its choice is inside, the summary on synthetic runs, and one real run of the command."""

import json

import numpy as np
import pytest

from dense_rl.bench import credit_comparison as cc
from dense_rl.bench import credit_runs as cr
from dense_rl.bench.efficiency_stats import guarded_crossings, guarded_ratio
from support.bench import run_bench

SAMPLES = np.array([0.0, 64.0, 128.0])


def test_guarded_crossings_interpolate_only_between_guarded_points():
    trained = [[0.0, 0.4, 0.8]] * 3
    unseen = [[1, 1, 1], [1, 0, 1], [1, 1, 0]]
    got = guarded_crossings([0, 10, 20], trained, unseen, targets=[0.6] * 3, floor=0.9)
    assert got[0] == pytest.approx(15.0) and got[1] == 20.0 and np.isnan(got[2])


def test_guarded_ratio_counts_a_hacked_point_as_not_reached():
    baseline_trained, baseline_unseen = [[0.0, 0.5, 1.0]] * 3, [[0.9, 0.9, 0.9]] * 3
    # Reaches the baseline's final 1.0 at 64 samples (interpolated from 0): twice as fast.
    fast = guarded_ratio(SAMPLES, baseline_trained, baseline_unseen, [[0.0, 1.0, 1.2]] * 3, [[0.9, 0.89, 0.89]] * 3,
                         floor=0.88)
    assert fast["value"] == pytest.approx(2.0) and fast["ci_low"] == fast["ci_high"] == pytest.approx(2.0)
    assert fast["baseline_samples"] == 128.0 and fast["method_samples"] == pytest.approx(64.0)
    # The same rewards with the unseen reward past the guard: never, ratio 0.
    hacked = guarded_ratio(SAMPLES, baseline_trained, baseline_unseen, [[0.0, 1.0, 1.2]] * 3, [[0.9, 0.5, 0.5]] * 3,
                           floor=0.88)
    assert hacked["value"] == 0.0 and hacked["method_samples"] is None and hacked["fraction_never"] == 1.0
    # A baseline whose own final point is past the guard has no guarded target time: no ratio.
    undefined = guarded_ratio(SAMPLES, baseline_trained, [[0.9, 0.9, 0.5]] * 3, [[0.0, 1.0, 1.2]] * 3,
                              [[0.9, 0.9, 0.9]] * 3, floor=0.88)
    assert undefined["value"] is None and undefined["baseline_samples"] is None
    assert undefined["method_samples"] == pytest.approx(64.0) and undefined["fraction_undefined"] == 1.0


def test_guarded_ratio_interval_spans_the_seeds():
    """Seeds that disagree give an interval around the point estimate, not a single value."""
    baseline = np.array([[0.0, 0.5, 1.0], [0.0, 0.6, 1.0], [0.0, 0.4, 1.0], [0.0, 0.5, 1.0]])
    method = np.array([[0.0, 1.0, 1.1], [0.0, 0.7, 1.1], [0.0, 1.2, 1.3], [0.0, 0.9, 1.0]])
    ones = np.ones_like(baseline)
    result = guarded_ratio(SAMPLES, baseline, ones, method, ones, floor=0.5)
    assert result["ci_low"] < result["value"] < result["ci_high"]
    assert result["target"] == pytest.approx(1.0)


def fake_run(family, reward, method, lr, seed, trained, unseen, curve=None):
    points = [{"policy_version": v, "samples": 32 * v, "trained": t, "unseen": u}
              for v, (t, u) in enumerate(zip(trained, unseen))]
    return {"family": family, "reward": reward, "method": method, "lr": lr, "seed": seed, "heldout_curve": points,
            "reward_mean": curve or list(np.linspace(trained[0], trained[-1], 4)), "epoch_seconds": [1.0] * 4,
            "samples_per_epoch": 32}


def test_guarded_best_skips_points_past_the_guard():
    run = fake_run("ddim", "brightness", "coca", 1e-3, 100, [0.3, 0.5, 0.9], [0.95, 0.94, 0.80])
    assert cr.guarded_best(run) == 0.5  # 0.9 came with the unseen reward 0.15 below the base
    hacked_at_once = fake_run("ddim", "brightness", "coca", 1e-3, 100, [0.3, 0.5, 0.9], [0.95, 0.90, 0.80])
    assert cr.guarded_best(hacked_at_once) == 0.3  # the base model is what a guarded run keeps


def test_the_sweep_widens_until_its_choice_is_inside():
    key = ("ddim", "preference", "uca")
    runs = {}
    state = cr.tuning_state(runs, *key)
    assert state["to_run"] == list(cr.FIRST_SWEEP) and state["chosen"] is None

    def add(lr, final):
        for seed in cr.TUNING_SEEDS:
            runs[(*key, lr, seed)] = fake_run(*key, lr, seed, [5.0, final], [0.95, 0.95])

    add(3e-4, 5.2), add(1e-3, 5.4), add(3e-3, 5.6)  # best at the top edge
    state = cr.tuning_state(runs, *key)
    assert state["chosen"] == 3e-3 and not state["inside"] and state["to_run"] == [1e-2]
    add(1e-2, 5.5)
    state = cr.tuning_state(runs, *key)
    assert state["chosen"] == 3e-3 and state["inside"] and state["to_run"] == []
    assert state["tried"] == [3e-4, 1e-3, 3e-3, 1e-2] and state["scores"]["0.003"] == pytest.approx(5.6)


def test_summary_compares_each_method_with_the_tuned_baseline_and_coca_with_uca():
    runs = {}
    finals = {"ddpo": 5.4, "uca": 5.6, "coca": 5.8}
    for method, final in finals.items():
        for lr, bonus in ((3e-4, -0.1), (1e-3, 0.0), (3e-3, -0.2)):
            for seed in (*cr.TUNING_SEEDS, *cr.EVALUATION_SEEDS):
                trained = [5.0, 5.0 + (final + bonus - 5.0) / 2 + 0.01 * seed, final + bonus]
                curve = list(np.linspace(5.0, final + bonus, 4) + 0.01 * seed)
                runs[("ddim", "preference", method, lr, seed)] = fake_run("ddim", "preference", method, lr, seed,
                                                                          trained, [0.95, 0.95, 0.94], curve)
    summary = cc.summarise(runs, ["ddim"], {"ddim": ["preference"]}, {"ddim": list(finals)})
    group = summary[0]
    assert {m: f["lr"] for m, f in group["methods"].items()} == {"ddpo": 1e-3, "uca": 1e-3, "coca": 1e-3}
    assert set(group["comparisons"]) == {"uca vs ddpo", "coca vs ddpo", "coca vs uca"}
    coca = group["comparisons"]["coca vs ddpo"]
    assert coca["plain"]["value"] > 1 and coca["guarded"]["value"] > 1
    assert group["guard_floor"] == pytest.approx(0.95 - cr.TOLERANCE)


@pytest.mark.slow
def test_one_run_records_its_heldout_curve_and_credit_cost(tmp_path):
    """A real in-process run through the command (`--one`, as --jobs starts each run): ode_gain on the
    DDIM model, with held-out evaluations of the trained and the unseen reward."""
    run_bench("credit-comparison", "--quick", "--out", str(tmp_path), "--one", "ddim,brightness,ode_gain,0.003,0",
              timeout=600)
    run = json.loads((tmp_path / "runs" / "ddim__brightness__ode_gain__lr0.003__seed0.json").read_text())
    assert (run["family"], run["method"], run["credit_mode"], run["lr"], run["phase"]) == \
        ("ddim", "ode_gain", "ode_gain", 0.003, "evaluation")
    versions = [point["policy_version"] for point in run["heldout_curve"]]
    assert versions == [0, 1, 2] and [p["samples"] for p in run["heldout_curve"]] == [0, 8, 16]
    assert all(0 < p["unseen"] <= 1 and 0 < p["trained"] < 1 for p in run["heldout_curve"])
    assert len(run["reward_mean"]) == 2 and min(run["credit_model_calls_per_sample"]) > 0
    # The run's folder is gone; the base model's held-out scores stay cached for the next run.
    assert [path.name for path in (tmp_path / "scratch").iterdir()] == [".heldout-base"]
