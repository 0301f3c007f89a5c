"""The scaling benchmark's steady timings and cost model T(N) = A/N + B + C on measurements generated
from known terms, and its report (results.json, plot, table)."""

from __future__ import annotations

import pytest

from dense_rl.bench import scaling
from dense_rl.bench.common import Report
from support.bench import assert_png, load_results

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
