"""`ray start --head` + `ray job submit -- python -m dense_rl.launch` runs the same job on that cluster."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dense_rl.run.storage import RunDir

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_cluster(temp_dir: Path, head_port: int) -> None:
    """Stop only the cluster whose processes use `temp_dir` (`ray stop` would stop every cluster here)."""
    import psutil

    current = Path("/tmp/ray/ray_current_cluster")  # where `ray start` records its address for ray.init()
    if current.is_file() and current.read_text().strip().endswith(f":{head_port}"):
        current.unlink()

    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(str(temp_dir) in part for part in process.info["cmdline"] or []):
                process.kill()
        except psutil.Error:
            pass


def submit_job(command: list, env: dict) -> subprocess.CompletedProcess:
    """`ray job submit`, retried while the new head's job agent is still starting (HTTP 500); on a
    loaded 2-core machine that took over a minute."""
    deadline = time.monotonic() + 240
    while True:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if "No available agent to submit job" not in result.stdout + result.stderr or time.monotonic() > deadline:
            return result
        time.sleep(3)


def test_job_submit_to_a_head_started_here(tmp_path):
    # The job's `python` is whatever was first on PATH when `ray start` ran: put the venv first.
    # (conftest.py turns token auth off: this head listens on loopback only.)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    dashboard, head_port = free_port(), free_port()
    temp_dir = Path("/tmp") / f"ray-test-{os.getpid()}"  # short: Ray's socket paths must fit 107 bytes
    subprocess.run(
        # 2 CPUs, as on a 2-core laptop: the default layout is chosen to fit what the head reports.
        [BIN / "ray", "start", "--head", "--num-cpus=2", f"--port={head_port}", f"--temp-dir={temp_dir}", "--node-ip-address=127.0.0.1",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         # The job agent's default port (52365) is taken while another Ray instance runs on this host.
         f"--dashboard-agent-listen-port={free_port()}",
         "--disable-usage-stats"],
        env=env, check=True, capture_output=True, timeout=120,
    )
    try:
        # Asking for more than the cluster has fails with one line instead of waiting forever.
        short = subprocess.run(
            [sys.executable, "-m", "dense_rl.launch", "--quiet", "--set", f"run.output_dir={tmp_path}",
             "--set", f"cluster.address=127.0.0.1:{head_port}", "--set", "cluster.reward_gpus=1",
             "--set", "cluster.resource_wait_s=0"],
            env=env, capture_output=True, text=True, timeout=300,
        )
        assert short.returncode == 2, short.stderr[-2000:]
        assert "error: cluster: the actors and learners ask for 1 GPU but the Ray cluster has 0" in short.stderr

        result = submit_job(
            [BIN / "ray", "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", str(REPO),
             "--runtime-env-json", json.dumps({"excludes": ["runs/", "tests/", "docs/"]}), "--",
             "python", "-m", "dense_rl.launch", "--config", "configs/tiny.yaml", "--quiet",
             "--set", f"run.output_dir={tmp_path}", "--set", "run.name=job", "--set", "run.num_epochs=2",
             "--set", "sample.num_steps=10", "--set", "sample.batch_size=8", "--set", "sample.num_batches_per_epoch=2",
             "--set", "train.batch_size=8"],
            env,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "succeeded" in result.stdout
        assert "layout for 2 CPUs: 2 rollout x 1 thread(s), 1 reward, 2 learner rank(s) x 1 thread(s)" in result.stdout
        assert f"done: {tmp_path}/job" in result.stdout
        assert RunDir(f"{tmp_path}/job").latest_checkpoint()["epoch"] == 2
    finally:
        stop_cluster(temp_dir, head_port)
