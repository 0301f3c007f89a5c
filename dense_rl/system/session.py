"""A run on Ray: join the configured cluster or start a private one, place the roles on it, check it
has the resources they ask for, then run the driver (dense_rl.system.driver) to the end, keeping the run
registry current."""

from __future__ import annotations

import logging
import math
import os
import time

import ray

from dense_rl.config import Config, ConfigError
from dense_rl.config.layout import async_sharing_note, describe_layout, fit_layout, placed
from dense_rl.run.checkpoints import load_resume_point
from dense_rl.run.records import RunRecorder
from dense_rl.run.registry import RunTracker
from dense_rl.run.storage import RunDir
from dense_rl.system.driver import Driver

log = logging.getLogger("dense_rl")


def start_ray(config: Config, verbose: bool = False) -> None:
    """Join the configured cluster, else the one `ray start` or `ray job submit` set up (RAY_ADDRESS),
    else start a private one here. `cluster.address: local` always starts a private one."""
    if ray.is_initialized():  # a caller (a notebook, a test) brought its own session
        return
    # Actor and worker output goes to Ray's log files (/tmp/ray/session_latest/logs) unless --verbose;
    # errors still reach the driver as exceptions.
    options = dict(logging_level=logging.INFO if verbose else logging.ERROR, log_to_driver=verbose)
    address = config.cluster.address
    if address and address != "local":
        ray.init(address=address, **options)
        return
    # This machine's CPUs (a layout left to dense_rl.config.layout fits them); an explicit layout sized for a
    # real cluster gets as many logical CPUs as it asks for, and its actors share the cores.
    needed = fit_layout(config, os.cpu_count() or 1).resources_needed()
    num_cpus = max(math.ceil(needed["CPU"]), os.cpu_count() or 1)
    # A private instance is one node holding every role: it advertises the cluster.*_resource units too.
    custom = {k: v for k, v in needed.items() if k not in ("CPU", "GPU")} or None
    if address == "local":
        ray.init(address="local", num_cpus=num_cpus, resources=custom, **options)
        without_preemption_watcher()
        return
    try:
        ray.init(num_cpus=num_cpus, resources=custom, **options)  # starts one unless RAY_ADDRESS / `ray start` names a cluster
    except ValueError as error:
        if "existing cluster" not in str(error):
            raise
        ray.init(**options)  # a running cluster brings its own resources
        return
    without_preemption_watcher()  # it started a private instance


def without_preemption_watcher() -> None:
    """For a private instance: Ray Train's preemption watcher moves the learner group off a node about to
    go, and a private instance has no other node, while the watcher's process competes with the roles'
    start-up. Ray Train reads it in the driver when fit() starts and hands it to its controller."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def wait_for_resources(config: Config) -> None:
    """Ray waits forever for resources that never come; fail instead, naming what is missing.
    An autoscaling cluster gets cluster.resource_wait_s to add nodes first."""
    needed = config.cluster.resources_needed()
    deadline = time.monotonic() + config.cluster.resource_wait_s
    while True:
        available = ray.cluster_resources()
        short = {k: v for k, v in needed.items() if v > available.get(k, 0.0) + 1e-9}
        if not short:
            return
        if time.monotonic() >= deadline:
            name, amount = next(iter(short.items()))
            raise ConfigError(
                f"cluster: the actors and learners ask for {amount:g} {name} but the Ray cluster has "
                f"{available.get(name, 0.0):g}; lower cluster.*_{name.lower()}s or the worker counts, or add nodes"
            )
        time.sleep(2.0)


def run_system(config: Config, run_uri: str, *, show_progress: bool = True, verbose: bool = False,
               on_epoch=None) -> list[dict]:
    """Start (or resume) the run in `run_uri` on Ray and train to config.run.num_epochs."""
    run = RunDir(run_uri)
    recorder = RunRecorder(run, config)
    state, weights, checkpoint = load_resume_point(run, config)
    own_session = not ray.is_initialized()
    start_ray(config, verbose)
    try:
        # Counts and CPU shares left empty are chosen from what this cluster has; config.yaml keeps
        # them empty, so a resume on another cluster chooses again.
        cluster_cpus = ray.cluster_resources().get("CPU", 1.0)
        config = placed(config, cluster_cpus)
        log.info(describe_layout(config.cluster, cluster_cpus))
        note = async_sharing_note(config.cluster, cluster_cpus)
        if note:
            log.warning(note)
        wait_for_resources(config)  # before anything is written: a run that cannot be placed leaves no trace
        if checkpoint is not None:
            log.info("resuming %s from %s (epoch %d)", run.uri, checkpoint, state.epoch)
        recorder.write_config(start_epoch=state.epoch)  # every session: its --set values are kept
        tracker = RunTracker.start(config, run.uri, state)  # the run registry (Redis or the run directory)
        try:
            driver = Driver(config, recorder, state, weights, resume_from=checkpoint)
            history = driver.run(show_progress=show_progress, on_epoch=tracker.on_epoch(then=on_epoch))
        except BaseException as error:
            tracker.finish("failed", error)
            raise
        tracker.finish("stopped" if driver.stopped_by else "finished", message=driver.stopped_by)
        return history
    finally:
        if own_session:
            ray.shutdown()
