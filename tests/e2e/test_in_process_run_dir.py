"""`python -m dense_rl.launch --in-process` writes the run directory the Ray system writes, and the same
commands work on it: `--resume` continues it exactly, `python -m dense_rl.evaluate` scores its checkpoints."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from dense_rl.run.storage import RunDir

pytestmark = pytest.mark.slow
SMALL = ["sample.num_steps=5", "credit.window_size=5", "sample.batch_size=8", "sample.num_batches_per_epoch=1",
         "sample.samples_per_prompt=4", "train.batch_size=8", "cluster.num_rollout_workers=1",
         "cluster.num_learner_workers=1"]


def launch(output_dir: Path, name: str, *options: str, in_process: bool = True, resume: bool = False) -> None:
    command = [sys.executable, "-m", "dense_rl.launch", "--quiet"]
    command += ["--resume", str(output_dir / name)] if resume else ["--config", "configs/tiny.yaml", "--set",
                                                                    f"run.output_dir={output_dir}", "--set", f"run.name={name}"]
    command += ["--in-process"] if in_process else ["--set", "cluster.address=local"]
    for option in ([] if resume else SMALL) + list(options):
        command += ["--set", option]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


# What Ray Train keeps in its storage folder for itself (the Ray learner group's checkpoint bookkeeping).
RAY_TRAIN_FILES = {"checkpoint_manager_snapshot.json", ".validate_storage_marker"}


def files(folder: Path) -> set[str]:
    """The run's files, relative to it, with the time in each session's checkpoint folder and Ray Train's
    own bookkeeping left out."""
    return {re.sub(r"from-epoch-(\d+)-\d{8}-\d{6}", r"from-epoch-\1", str(path.relative_to(folder)))
            for path in folder.rglob("*") if path.is_file() and path.name not in RAY_TRAIN_FILES}


def test_in_process_and_ray_runs_write_the_same_run_directory(tmp_path):
    # Three epochs, two checkpoints kept: both prune the session's oldest checkpoint alike.
    launch(tmp_path, "in-process", "run.num_epochs=3", "checkpoint.keep=2")
    launch(tmp_path, "ray", "run.num_epochs=3", "checkpoint.keep=2", in_process=False)
    in_process, ray = files(tmp_path / "in-process"), files(tmp_path / "ray")
    assert in_process == ray
    assert {"latest.json", "registry.json", "metrics.parquet", "samples/epoch-0002.parquet", "images/epoch-0002.png",
            "checkpoints/from-epoch-0000/epoch-0003/pytorch_lora_weights.safetensors",
            "checkpoints/from-epoch-0000/epoch-0003/optimizer.safetensors"} <= in_process
    assert {name.split("/")[2] for name in in_process if name.startswith("checkpoints/")} == {"epoch-0002", "epoch-0003"}
    # The same metrics, but for the timings each system splits its own way (a broadcast is Ray's only).
    columns = {name: {column for column in RunDir(str(tmp_path / name)).read_table("metrics.parquet")[0]
                      if not column.startswith("seconds_") and not column.endswith("_seconds")}
               for name in ("in-process", "ray")}
    assert columns["ray"] <= columns["in-process"]
    record = RunDir(str(tmp_path / "in-process")).read_json("registry.json")
    assert record["status"] == "finished" and record["epoch"] == 3


def test_an_in_process_run_resumes_exactly_and_is_evaluated_like_any_run(tmp_path):
    launch(tmp_path, "whole", "run.num_epochs=3")
    launch(tmp_path, "resumed", "run.num_epochs=2")
    launch(tmp_path, "resumed", "run.num_epochs=3", resume=True)

    def rewards(name):
        return [row["reward_mean"] for row in RunDir(str(tmp_path / name)).read_table("metrics.parquet")]

    assert rewards("resumed") == rewards("whole") and len(rewards("whole")) == 3
    assert len(files(tmp_path / "resumed") & {"config_history/000-from-epoch-0000.yaml",
                                              "config_history/001-from-epoch-0002.yaml"}) == 2

    done = subprocess.run([sys.executable, "-m", "dense_rl.evaluate", str(tmp_path / "resumed"), "--rewards",
                           "digit_alignment", "--checkpoints", "all", "--max-prompts", "4", "--threads", "1"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = RunDir(str(tmp_path / "resumed")).read_table("unseen_rewards.parquet")
    assert sorted({row["policy_version"] for row in rows}) == [0, 1, 2, 3]
