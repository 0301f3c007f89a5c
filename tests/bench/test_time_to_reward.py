"""`python -m dense_rl.bench time-to-reward`: the reading of seconds to a target on known curves, and one
quick real run of the Ray system that stops where its reward reaches the target."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from dense_rl.bench import time_to_reward as ttr
from dense_rl.bench.peer import epoch_summary
from support.bench import REPO, run_bench


def run_of(rewards: list[float], first: float = 30.0, steady: float = 10.0) -> dict:
    count = len(rewards)
    return epoch_summary([first] + [steady] * (count - 1), first, [1.0] * count, [1.0] * count, rewards, 32)


def test_the_target_is_the_mean_of_the_last_two_epochs():
    assert ttr.running_mean([1.0, 3.0, 5.0, 9.0]) == [1.0, 2.0, 4.0, 7.0]
    assert ttr.target_of(run_of([-5.0, -4.0, -3.0, -2.0])) == pytest.approx(-2.5)


def test_seconds_to_reach_read_the_first_epoch_whose_two_epoch_mean_gets_there():
    run = run_of([-5.0, -3.0, -2.6, -2.2, -3.0])  # ends at 30, 40, 50, 60, 70 s
    assert run["epoch_end_seconds"] == [30.0, 40.0, 50.0, 60.0, 70.0]
    assert ttr.seconds_to_reach(run, -2.8) == (50.0, 2)  # (-3.0 - 2.6) / 2 = -2.8 at the third epoch
    assert ttr.seconds_to_reach(run, -2.5) == (60.0, 3)
    assert ttr.seconds_to_reach(run, -2.3) == (None, None)  # the best two-epoch mean is -2.4
    assert ttr.seconds_to_reach(run_of([0.0, -9.0]), -1.0) == (None, None)  # one good epoch alone is not enough
    assert ttr.reaches(-2.8)([-5.0, -3.0, -2.6]) and not ttr.reaches(-2.8)([-5.0, -3.0])


def test_summary_pairs_each_dense_rl_run_with_its_repeats_trl_run():
    trl = [run_of([-5.0, -4.0, -3.0, -3.0]), run_of([-5.0, -4.0, -3.5, -3.5])]  # targets -3.0 and -3.5
    targets = [ttr.target_of(run) for run in trl]
    coca = [run_of([-5.0, -3.0, -3.0]), run_of([-5.0, -5.0, -5.0])]  # the second never reaches -3.5
    sparse = [run_of([-5.0, -4.0, -3.0, -3.0]), run_of([-4.0, -3.0])]
    summary = ttr.summarise({"trl": trl, "coca": coca, "sparse": sparse}, targets)
    assert summary["setups"]["trl"]["seconds"] == [60.0, 60.0]  # both reach their own final reward at the end
    assert summary["setups"]["coca"]["seconds"] == [50.0, None] and summary["setups"]["coca"]["median_seconds"] is None
    assert summary["setups"]["coca"]["speedup_over_trl"] == [pytest.approx(1.2), None]
    assert summary["setups"]["coca"]["median_speedup_over_trl"] is None
    assert summary["setups"]["sparse"]["seconds"] == [60.0, 40.0]  # the second against its own repeat's -3.5
    assert summary["setups"]["sparse"]["speedup_over_trl"] == pytest.approx([1.0, 1.5])
    assert summary["setups"]["sparse"]["median_speedup_over_trl"] == pytest.approx(1.25)


def test_bad_arguments_stop_before_any_run(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "dense_rl.bench", "time-to-reward", *args], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)

    no_target = run("--model", str(tmp_path))
    assert no_target.returncode == 2 and "--target REWARD" in no_target.stderr and "--trl-python" in no_target.stderr
    no_model = run("--model", str(tmp_path), "--target", "0")
    assert no_model.returncode == 2 and "make_tiny_sd.py" in no_model.stderr


@pytest.mark.slow
def test_a_quick_run_stops_once_it_reaches_a_given_target(tiny_sd_dir, tmp_path):
    """A target every run reaches: the Ray system stops after the two epochs the target's mean needs,
    though its budget is four."""
    model = tmp_path / "model"
    shutil.copytree(tiny_sd_dir, model)
    (model / "prompts.txt").write_text("cat\ndog\nhorse\n")
    out = tmp_path / "out"
    result = run_bench("time-to-reward", "--model", str(model), "--quick", "--target=-1e9", "--setups", "coca",
                       "--trl-epochs", "4", "--budget-factor", "1", "--out", str(out), timeout=900)
    data = json.loads((out / "results.json").read_text())
    assert data["complete"] and data["settings"]["budget_epochs"] == 4
    (run,) = data["runs"]["coca"]
    assert len(run["reward_mean"]) == 2 and len(run["epoch_end_seconds"]) == 2
    entry = data["summary"]["setups"]["coca"]
    assert entry["epochs"] == [1] and entry["seconds"] == [pytest.approx(run["epoch_end_seconds"][1])]
    assert "| coca" in result.stdout
