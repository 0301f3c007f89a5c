"""Guards against reward hacking, end to end with the commands a user runs: the embedded model trained on
`brightness` with CoCA games it (its digits fade into brightness), which the unseen `digit_alignment`
reward shows on held-out prompts. With a guard of 0.05 on it (`action: stop`) the run stops when it trips,
before its budget, and best.json names a checkpoint within 0.05 of the base model, as
`python -m dense_rl.evaluate --checkpoints best` confirms; without the guard the run goes to its budget
and heldout.parquet shows the drop."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dense_rl.diffusion.lora import read_lora_file
from dense_rl.run.storage import RunDir

pytestmark = pytest.mark.slow
EPOCHS = 10
# A learning rate and clip range ten times the preset's, so the reward is gamed within the budget.
HACKED = ["rewards=[{name: brightness}]", "credit.mode=coca", "sample.num_steps=10", "train.lr=1e-2",
          "train.clip_range=1e-2", f"run.num_epochs={EPOCHS}", "evaluation.every_epochs=2", "evaluation.max_prompts=24",
          "evaluation.rewards=[digit_alignment]"]
GUARD = "guards=[{metric: digit_alignment, max_drop: 0.05, action: stop}]"


def launch(tmp_path, name: str, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "dense_rl.launch", "--config", "configs/tiny.yaml", "--in-process", "--quiet",
               "--set", f"run.output_dir={tmp_path}", "--set", f"run.name={name}"]
    for override in HACKED + list(overrides):
        command += ["--set", override]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def alignment(rows: list[dict]) -> dict[int, float]:
    return {row["policy_version"]: row["mean"] for row in rows if row["reward"] == "digit_alignment"}


def test_a_guard_stops_the_run_when_the_unseen_reward_falls_and_names_the_best_checkpoint(tmp_path):
    guarded = launch(tmp_path, "guarded", GUARD)
    run = RunDir(f"{tmp_path}/guarded")
    held_out = alignment(run.read_table("heldout.parquet"))
    base, epochs = held_out[0], [row["epoch"] for row in run.read_table("metrics.parquet")]
    assert len(epochs) < EPOCHS  # stopped before its budget...
    stopped_at = epochs[-1] + 1
    assert held_out[stopped_at] < base - 0.05  # ...by the evaluation that tripped the guard
    assert all(value >= base - 0.05 for version, value in held_out.items() if version < stopped_at)
    stop_line = next(line for line in guarded.stdout.splitlines() if line.startswith("stopped: "))
    assert f"digit_alignment max_drop 0.05: {held_out[stopped_at]:.4f} at epoch {epochs[-1]}" in stop_line
    assert run.read_json("registry.json")["status"] == "stopped"

    best = run.read_json("best.json")
    assert 0 < best["policy_version"] < stopped_at and best["scores"]["digit_alignment"] >= base - 0.05
    assert best["scores"]["digit_alignment"] == pytest.approx(held_out[best["policy_version"]])
    # Evaluated again from its own files, with the run's held-out settings: the same score.
    done = subprocess.run([sys.executable, "-m", "dense_rl.evaluate", run.uri, "--rewards", "digit_alignment",
                           "--checkpoints", "best", "--no-base", "--max-prompts", "24", "--seed", "1234"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    again = [row["reward_digit_alignment"] for row in run.read_table("unseen_rewards.parquet")]
    assert sum(again) / len(again) == pytest.approx(best["scores"]["digit_alignment"], abs=1e-5)
    # The LoRA export takes it too.
    exported = subprocess.run([sys.executable, "-m", "dense_rl.export", run.uri, "--checkpoint", "best", "--out",
                               str(tmp_path / "exported")], capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr[-3000:]
    ours, theirs = read_lora_file(tmp_path / "exported"), read_lora_file(f"{run.uri}/{best['checkpoint']}")
    assert ours.keys() == theirs.keys() and all((ours[key] == theirs[key]).all() for key in ours)

    # The same run without the guard trains to its budget, and its held-out rows show the unseen reward fall.
    launch(tmp_path, "unguarded")
    unguarded = RunDir(f"{tmp_path}/unguarded")
    assert len(unguarded.read_table("metrics.parquet")) == EPOCHS
    rows = unguarded.read_table("heldout.parquet")
    held_out = alignment(rows)
    assert sorted(held_out) == [0, 2, 4, 6, 8, 10] and held_out[EPOCHS] < held_out[0] - 0.05
    # With no guard, the best checkpoint is simply the one with the highest held-out trained reward.
    trained = {row["policy_version"]: row["mean"] for row in rows if row["reward"] == "trained" and row["policy_version"]}
    assert unguarded.read_json("best.json")["policy_version"] == max(trained, key=trained.get)
