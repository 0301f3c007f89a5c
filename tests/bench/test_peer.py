"""The peer benchmark reads the peer script's output as the peer counts it, summarises repeats, and runs
`--quick` in process on an SD-shaped model folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from support.bench import REPO, load_results, run_bench

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
