"""Killing a launched job and its Ray processes, and reading how far its run got."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import psutil

from dense_rl.run.storage import RunDir


def kill_job(process: subprocess.Popen, ray_tmpdir: Path) -> None:
    """SIGKILL the job's process group, then any Ray process of its own (they name its RAY_TMPDIR)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    for other in psutil.process_iter(["cmdline"]):
        try:
            if any(str(ray_tmpdir) in part for part in other.info["cmdline"] or []):
                other.kill()
        except psutil.Error:
            pass


def latest_epoch(run: RunDir) -> int:
    latest = run.latest_checkpoint()
    return -1 if latest is None else latest["epoch"]


