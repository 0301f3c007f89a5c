"""Fault injection for the reliability tests: real faults at chosen points of a real run.

A test writes a JSON plan (a list of faults) and names the file in DENSE_RL_CHAOS before Ray starts,
so every actor and learner process inherits it. Each fault says where it strikes and what it does:

    {"point": "rollout", "version": 1, "action": "sigkill", "times": 1}
    {"point": "reward", "name": "preference", "version": 1, "action": "raise", "times": 2}
    {"point": "reward_values", "version": 2, "action": "nan", "rows": [0, 3]}
    {"point": "learner", "version": 1, "rank": 0, "action": "sigkill"}
    {"point": "rollout", "version": 1, "action": "pause", "seconds": 20}

"sigkill" kills the process itself (as the kernel or a preempted node would), "raise" raises, "pause"
sleeps after writing `<plan>.paused-<pid>` holding the Ray actor id (so a test can kill the actor from
outside while it is busy), "nan" is read by the caller. `times` bounds how often a fault fires across all processes and
restarts: each firing claims a marker file with O_EXCL. Without DENSE_RL_CHAOS (any real run) every
hook returns at once.
"""

from __future__ import annotations

import json
import os
import signal
import time

ENV = "DENSE_RL_CHAOS"


def planned() -> bool:
    """Whether this process runs under a fault plan (a test)."""
    return bool(os.environ.get(ENV))


def fire(point: str, version: int | None = None, **where) -> dict | None:
    """The fault planned for this point, if one matches and has firings left (claimed here), else None."""
    path = os.environ.get(ENV)
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as file:
            plan = json.load(file)
    except (OSError, ValueError):
        return None
    for index, fault in enumerate(plan):
        if fault.get("point") != point or fault.get("version", version) != version:
            continue
        if any(fault.get(key, value) != value for key, value in where.items()):
            continue
        for firing in range(fault.get("times", 1)):
            try:
                os.close(os.open(f"{path}.fired-{index}-{firing}", os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                continue
            return fault
    return None


def strike(point: str, version: int | None = None, **where) -> dict | None:
    """Carry out a planned sigkill, raise or pause here; return any other fault for the caller."""
    fault = fire(point, version, **where)
    if fault is None:
        return None
    action = fault["action"]
    if action == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "raise":
        raise RuntimeError(fault.get("message", f"injected fault at {point}"))
    if action == "pause":
        import ray

        with open(f"{os.environ[ENV]}.paused-{os.getpid()}", "w", encoding="utf-8") as marker:
            marker.write(ray.get_runtime_context().get_actor_id() or "")
        time.sleep(float(fault.get("seconds", 30)))
    return fault
