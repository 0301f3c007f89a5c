"""`python -m dense_rl.bench learner-start` brings up Ray Train's learner group and the plain-actor
group, and names the processes each starts."""

from __future__ import annotations

import json

import pytest

from support.bench import run_bench


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
