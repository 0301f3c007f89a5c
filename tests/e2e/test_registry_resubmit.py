"""Real processes, real Redis: a `python -m dense_rl.launch` job keeps training while Redis is down,
the registry catches up when it returns, and after the job is killed, the same command (no --resume)
continues from the registry's checkpoint."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dense_rl.run.registry import REDIS_URL_ENV, RedisRegistry, RegistryUnavailable
from dense_rl.run.storage import RunDir
from support.jobs import kill_job, latest_epoch
from support.servers import RedisServer, needs_redis, wait_for

pytestmark = [pytest.mark.slow, needs_redis]
REPO = Path(__file__).resolve().parents[2]
NUM_EPOCHS = 10


def launch_command(output_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "dense_rl.launch", "--config", "configs/tiny.yaml", "--quiet",
        "--set", "cluster.address=local", "--set", f"run.output_dir={output_dir}", "--set", "run.name=resubmitted",
        "--set", f"run.num_epochs={NUM_EPOCHS}", "--set", "cluster.num_rollout_workers=1",
        "--set", "cluster.num_learner_workers=1", "--set", "sample.num_steps=10", "--set", "sample.batch_size=8",
        "--set", "sample.num_batches_per_epoch=1", "--set", "train.batch_size=8",
        # A private local instance advertises the role resources itself (one node holds every role).
        "--set", "cluster.rollout_resource=rollout", "--set", "cluster.learner_resource=learner",
    ]


def test_redis_outage_then_kill_then_resubmit_under_the_same_name(tmp_path):
    redis_server = RedisServer(tmp_path / "redis").start()
    ray_tmpdir = Path("/tmp") / f"rr-{os.getpid()}"  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, REDIS_URL_ENV: redis_server.url, "RAY_TMPDIR": str(ray_tmpdir)}
    registry = RedisRegistry(redis_server.url)
    run = RunDir(f"{tmp_path}/runs/resubmitted")
    command = launch_command(tmp_path / "runs")
    first_log = tmp_path / "first.log"
    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=first_log.open("w"), stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        wait_for(lambda: (registry.get("resubmitted") or {}).get("epoch", 0) >= 1, "epoch 1 in the registry", 600)

        # Redis goes away: the job keeps training and checkpointing.
        redis_server.stop()
        down_at = latest_epoch(run)
        wait_for(lambda: latest_epoch(run) >= down_at + 2, "two epochs while Redis is down", 600)
        assert first.poll() is None, first_log.read_text()[-3000:]
        with pytest.raises(RegistryUnavailable):
            registry.get("resubmitted")

        # Redis comes back empty; the registry catches up with what happened meanwhile.
        redis_server.start()
        caught_up_to = latest_epoch(run)
        record = wait_for(lambda: (r := registry.get("resubmitted")) and r["epoch"] >= caught_up_to and r,
                          "the registry to catch up", 600)
        assert record["status"] == "running" and record["run_uri"] == run.uri

        kill_job(first, ray_tmpdir)
        killed = registry.get("resubmitted")
        assert killed["status"] == "running"  # SIGKILL: no chance to say otherwise; the heartbeat stops
        assert killed["epoch"] < NUM_EPOCHS, "the job finished before it could be killed"
        resume_epoch = latest_epoch(run)
        # The checkpoint of the epoch in flight may have landed just before the kill.
        assert killed["epoch"] <= resume_epoch <= killed["epoch"] + 1
        assert killed["checkpoint"].startswith(f"{run.uri}/checkpoints/")
        log = first_log.read_text()
        assert "run registry unavailable" in log and "run registry back" in log

        # The same command again, no --resume: the registry names the run, it continues.
        second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        assert "is in the registry: resuming" in second.stderr
        assert f"(epoch {resume_epoch})" in second.stderr

        final = registry.get("resubmitted")
        assert final["status"] == "finished" and final["epoch"] == NUM_EPOCHS and final["policy_version"] == NUM_EPOCHS
        assert final["resumed_from_epoch"] == resume_epoch and final["attempts"] == 2
        assert [row["epoch"] for row in run.read_table("metrics.parquet")] == list(range(NUM_EPOCHS))
        fits = sorted(p.name for p in (tmp_path / "runs" / "resubmitted" / "checkpoints").iterdir() if p.is_dir())
        assert fits[0].startswith("from-epoch-0000-") and fits[1].startswith(f"from-epoch-{resume_epoch:04d}-")
        assert final["checkpoint"] == f"{run.uri}/{run.latest_checkpoint()['path']}"
    finally:
        kill_job(first, ray_tmpdir)
        redis_server.stop()
        shutil.rmtree(ray_tmpdir, ignore_errors=True)
