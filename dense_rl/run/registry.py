"""The run registry: one record per run name (status, epoch, policy version, latest checkpoint URI,
last metrics, heartbeat), kept current by the driver.

Two stores, one interface (`put`, `get`, `list`):

- Redis, when DENSE_RL_REDIS_URL is set (e.g. redis://redis:6379/0). The password comes from the URL
  or DENSE_RL_REDIS_PASSWORD (on Kubernetes: a Secret mapped into the environment), never from a
  config file or manifest. A resubmitted job with the same run.name resumes from the registered run.
  Keys: `dense_rl:run:<name>` (the record as JSON) and the set `dense_rl:runs` (every name).
- The run directory otherwise (the embedded default): `<output_dir>/<name>/registry.json`.

Redis going away never stops training: the tracker keeps the newest record in memory, logs once, and
writes it (a whole record, not a delta) as soon as Redis answers again, on the next epoch or heartbeat.

    python -m dense_rl.runs list            # reads whichever store is configured
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from urllib.parse import urlsplit, urlunsplit

from dense_rl.config import Config, ConfigError
from dense_rl.run.checkpoints import latest_checkpoint
from dense_rl.run.heldout import read_best
from dense_rl.run.storage import RunDir

log = logging.getLogger("dense_rl")

REDIS_URL_ENV = "DENSE_RL_REDIS_URL"
REDIS_PASSWORD_ENV = "DENSE_RL_REDIS_PASSWORD"
REGISTRY_FILE = "registry.json"
KEY_PREFIX = "dense_rl:run:"
NAMES_KEY = "dense_rl:runs"
HEARTBEAT_S = 10.0  # how often a running driver refreshes its heartbeat (and retries a down Redis)


class RegistryUnavailable(RuntimeError):
    """The store could not be reached; the caller keeps the record and tries again later."""


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{netloc}"))


class RedisRegistry:
    def __init__(self, url: str, password: str | None = None, timeout_s: float = 2.0):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.url = url
        # No client-side retries: a down Redis should cost the driver one refused connection, not a
        # backoff loop; the tracker retries on its own schedule.
        self.client = redis.Redis.from_url(
            url, password=password, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0), decode_responses=True,
        )

    @classmethod
    def from_env(cls) -> "RedisRegistry":
        return cls(os.environ[REDIS_URL_ENV], password=os.environ.get(REDIS_PASSWORD_ENV) or None)

    @property
    def where(self) -> str:
        return f"Redis {redact(self.url)}"

    def _call(self, operation):
        import redis

        try:
            return operation()
        except (redis.ConnectionError, redis.TimeoutError, OSError) as error:
            raise RegistryUnavailable(f"{self.where}: {error}") from None

    def put(self, record: dict) -> None:
        def write():
            pipe = self.client.pipeline(transaction=True)
            pipe.set(KEY_PREFIX + record["name"], json.dumps(record, sort_keys=True))
            pipe.sadd(NAMES_KEY, record["name"])
            pipe.execute()

        self._call(write)

    def get(self, name: str) -> dict | None:
        text = self._call(lambda: self.client.get(KEY_PREFIX + name))
        return None if text is None else json.loads(text)

    def list(self) -> list[dict]:
        names = sorted(self._call(lambda: self.client.smembers(NAMES_KEY)))
        return [record for record in (self.get(name) for name in names) if record is not None]


class FileRegistry:
    """Records in the run directories under one output_dir (a path or a pyarrow filesystem URI)."""

    def __init__(self, output_dir: str):
        self.output = RunDir(output_dir)

    @property
    def where(self) -> str:
        return self.output.uri

    def put(self, record: dict) -> None:
        try:
            RunDir(record["run_uri"]).write_json(REGISTRY_FILE, record)
        except OSError as error:
            raise RegistryUnavailable(f"{record['run_uri']}: {error}") from None

    def get(self, name: str) -> dict | None:
        run = self.output.child(name)
        return run.read_json(REGISTRY_FILE) if run.exists(REGISTRY_FILE) else None

    def list(self) -> list[dict]:
        import pyarrow.fs as pafs

        if not self.output.exists(""):
            return []
        entries = self.output.fs.get_file_info(pafs.FileSelector(self.output.root))
        names = sorted(e.base_name for e in entries if e.type == pafs.FileType.Directory)
        return [record for record in (self.get(name) for name in names) if record is not None]


def open_registry(output_dir: str) -> RedisRegistry | FileRegistry:
    """Redis when DENSE_RL_REDIS_URL is set, else the run directories under output_dir."""
    if os.environ.get(REDIS_URL_ENV):
        return RedisRegistry.from_env()
    return FileRegistry(output_dir)


def registered_run_uri(config: Config) -> str | None:
    """The run directory to resume for a job resubmitted under the same run.name: the one the Redis
    registry holds for that name, if it has a config to resume from. None without Redis."""
    if not os.environ.get(REDIS_URL_ENV) or not config.run.name:
        return None
    registry = RedisRegistry.from_env()
    try:
        record = registry.get(config.run.name)
    except RegistryUnavailable as error:
        raise ConfigError(
            f"{REDIS_URL_ENV}: cannot reach the run registry ({error}); start Redis, fix the URL, or unset it"
        ) from None
    if record is None:
        return None
    from dense_rl.run.storage import CONFIG_FILE

    return record["run_uri"] if RunDir(record["run_uri"]).exists(CONFIG_FILE) else None


# ---------------------------------------------------------------------- the driver's side


class RunTracker:
    """Keeps one run's record current: after every epoch, and on a heartbeat thread in between.

    Every write is the whole newest record, so a write that fails (store down) is simply superseded by
    the next one; nothing queues up and training never waits longer than one connection timeout."""

    def __init__(self, registry, record: dict, heartbeat_s: float = HEARTBEAT_S):
        self.registry = registry
        self.record = record
        self.heartbeat_s = heartbeat_s
        self.write_lock = threading.Lock()  # the heartbeat thread and the driver never interleave writes
        self.unavailable_since: float | None = None
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._heartbeat, name="registry-heartbeat", daemon=True)

    @classmethod
    def start(cls, config: Config, run_uri: str, state, heartbeat_s: float = HEARTBEAT_S) -> "RunTracker":
        registry = open_registry(config.run.output_dir)
        previous = None
        try:
            previous = registry.get(config.run.name)
        except RegistryUnavailable:
            pass  # written when the store returns
        latest = latest_checkpoint(RunDir(run_uri))
        now = time.time()
        record = {
            "name": config.run.name,
            "run_uri": run_uri,
            "status": "running",
            "epoch": state.epoch,
            "num_epochs": config.run.num_epochs,
            "policy_version": state.epoch,
            "checkpoint": None if latest is None else f"{run_uri.rstrip('/')}/{latest['path']}",
            "metrics": state.history[-1] if state.history else {},
            "started": previous["started"] if previous else now,
            "resumed_from_epoch": state.epoch if latest is not None else None,
            "attempts": (previous.get("attempts", 1) + 1) if previous else 1,
            "heartbeat": now,
            "error": None,
        }
        tracker = cls(registry, record, heartbeat_s)
        tracker.flush()
        tracker.thread.start()
        return tracker

    def flush(self) -> bool:
        """Write the newest record now; False (and a warning, once per outage) if the store is down."""
        with self.write_lock:
            self.record["heartbeat"] = time.time()
            try:
                self.registry.put(dict(self.record))
            except RegistryUnavailable as error:
                if self.unavailable_since is None:
                    self.unavailable_since = time.time()
                    log.warning("run registry unavailable (%s); training goes on and the record catches up "
                                "when it returns", error)
                return False
            if self.unavailable_since is not None:
                log.warning("run registry back after %.0f s; record caught up to epoch %d",
                            time.time() - self.unavailable_since, self.record["epoch"])
                self.unavailable_since = None
            return True

    def _heartbeat(self) -> None:
        while not self.stopped.wait(self.heartbeat_s):
            self.flush()

    def record_epoch(self, run: RunDir, metrics: dict) -> None:
        """The epoch just recorded in `run`, its newest checkpoint and its best one (best.json)."""
        latest, best = latest_checkpoint(run), read_best(run)
        root = self.record["run_uri"].rstrip("/")
        with self.write_lock:
            self.record.update(
                epoch=metrics["epoch"] + 1, policy_version=metrics["policy_version"], metrics=dict(metrics),
                checkpoint=None if latest is None else f"{root}/{latest['path']}",
                best=None if best is None else f"{root}/{best['checkpoint']}",
            )
        self.flush()

    def on_epoch(self, then=None):
        """A Driver.run on_epoch callback that records the epoch, then calls `then(driver, metrics)`."""

        def record_epoch(driver, metrics: dict) -> None:
            self.record_epoch(driver.recorder.run, metrics)
            if then is not None:
                then(driver, metrics)

        return record_epoch

    def finish(self, status: str, error: BaseException | None = None, message: str | None = None) -> None:
        """Final status ("finished", "stopped" by a guard, with its line as `message`, or "failed"); a last
        try to write it."""
        self.stopped.set()
        self.thread.join(timeout=self.heartbeat_s + 5)
        with self.write_lock:
            self.record["status"] = status
            self.record["error"] = None if error is None else f"{type(error).__name__}: {error}"[:500]
            if message is not None:
                self.record["stopped_by"] = message
        self.flush()
