"""The run registry against a real redis-server started here (and the run-directory store): records,
the password from the environment, the `runs` CLI, and catching up after Redis restarts."""

from __future__ import annotations

import json
import types

import pytest

from dense_rl import runs
from dense_rl.config import ConfigError, load_config
from dense_rl.run.checkpoints import DriverState
from dense_rl.run.records import RunRecorder
from dense_rl.run.registry import (
    REDIS_PASSWORD_ENV,
    REDIS_URL_ENV,
    FileRegistry,
    RedisRegistry,
    RegistryUnavailable,
    RunTracker,
    registered_run_uri,
)
from dense_rl.run.storage import RunDir
from support.servers import RedisServer, free_port, needs_redis, wait_for


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def epoch_metrics(epoch: int) -> dict:
    return {"epoch": epoch, "policy_version": epoch + 1, "reward_mean": 0.5 + epoch, "samples_seen": 8 * (epoch + 1)}


def finish_epoch(run: RunDir, driver, tracker: RunTracker, epoch: int) -> None:
    """What the driver does at the end of an epoch: checkpoint + latest.json, then the on_epoch callback."""
    path = f"checkpoints/fit/epoch-{epoch + 1:04d}"
    run.write_json(f"{path}/driver_state.json", {"epoch": epoch + 1})
    run.mark_latest(epoch + 1, path)
    tracker.on_epoch()(driver, epoch_metrics(epoch))


@needs_redis
def test_redis_registry_with_password_from_the_environment(tmp_path, monkeypatch, capsys):
    server = RedisServer(tmp_path / "redis", password="s3cret-from-a-secret").start()
    try:
        monkeypatch.setenv(REDIS_URL_ENV, server.url)  # no password in the URL, as in the manifests
        with pytest.raises(RegistryUnavailable):
            RedisRegistry(server.url).get("x")  # Redis refuses a client without the password
        monkeypatch.setenv(REDIS_PASSWORD_ENV, "s3cret-from-a-secret")
        registry = RedisRegistry.from_env()
        registry.put({"name": "b", "run_uri": "/r/b", "epoch": 1})
        registry.put({"name": "a", "run_uri": "/r/a", "epoch": 2})
        registry.put({"name": "a", "run_uri": "/r/a", "epoch": 3})
        assert [r["name"] for r in registry.list()] == ["a", "b"]
        assert registry.get("a") == {"name": "a", "run_uri": "/r/a", "epoch": 3}
        # What another client (redis-cli, a dashboard) sees: plain JSON under a documented key.
        assert json.loads(server.client().get("dense_rl:run:a"))["epoch"] == 3
        assert registry.get("missing") is None
        assert runs.main(["list"]) == 0  # the CLI reads Redis when DENSE_RL_REDIS_URL is set
        assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["NAME", "a", "b"]
    finally:
        server.stop()


@needs_redis
def test_tracker_keeps_training_while_redis_is_down_and_catches_up(tmp_path, monkeypatch, redis_server, caplog):
    monkeypatch.setenv(REDIS_URL_ENV, redis_server.url)
    config = load_config("configs/tiny.yaml", [f"run.output_dir={tmp_path}", "run.name=flaky", "run.num_epochs=5"])
    run = RunDir(f"{tmp_path}/flaky")
    driver = types.SimpleNamespace(recorder=RunRecorder(run, config))  # the one attribute the callback reads
    tracker = RunTracker.start(config, run.uri, DriverState(), heartbeat_s=0.2)
    registry = RedisRegistry(redis_server.url)
    assert registry.get("flaky")["status"] == "running" and registry.get("flaky")["epoch"] == 0

    finish_epoch(run, driver, tracker, 0)
    assert registry.get("flaky")["epoch"] == 1

    redis_server.stop()
    for epoch in (1, 2):  # the driver's callbacks return normally while Redis is gone
        finish_epoch(run, driver, tracker, epoch)
    assert "run registry unavailable" in caplog.text
    with pytest.raises(RegistryUnavailable):
        registry.get("flaky")

    redis_server.start()  # back, and empty: it kept nothing
    # No epoch ends in between: the heartbeat alone brings the record up to date.
    record = wait_for(lambda: registry.get("flaky"), "the record to reappear in Redis")
    assert record["epoch"] == 3 and record["policy_version"] == 3
    assert record["checkpoint"] == f"{run.uri}/checkpoints/fit/epoch-0003"
    assert record["metrics"] == epoch_metrics(2)
    assert "run registry back" in caplog.text

    finish_epoch(run, driver, tracker, 3)
    tracker.finish("finished")
    final = registry.get("flaky")
    assert final["status"] == "finished" and final["epoch"] == 4 and final["heartbeat"] >= record["heartbeat"]


def test_file_registry_and_runs_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(REDIS_URL_ENV, raising=False)
    for name, epochs in (("beta", 2), ("alpha", 1)):
        config = load_config("configs/tiny.yaml", [f"run.output_dir={tmp_path}", f"run.name={name}"])
        run = RunDir(f"{tmp_path}/{name}")
        tracker = RunTracker.start(config, run.uri, DriverState())
        driver = types.SimpleNamespace(recorder=RunRecorder(run, config))
        for epoch in range(epochs):
            finish_epoch(run, driver, tracker, epoch)
        tracker.finish("failed" if name == "alpha" else "finished", RuntimeError("reward model crashed"))
    (tmp_path / "not-a-run").mkdir()

    registry = FileRegistry(str(tmp_path))
    assert [r["name"] for r in registry.list()] == ["alpha", "beta"]
    assert json.loads((tmp_path / "beta" / "registry.json").read_text())["epoch"] == 2

    assert runs.main(["list", "--output-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["NAME", "STATUS", "EPOCH"]
    assert lines[1].split()[:4] == ["alpha", "failed", "1/12", "1"]
    assert lines[2].split()[:5] == ["beta", "finished", "2/12", "2", "1.5000"]

    assert runs.main(["show", "alpha", "--output-dir", str(tmp_path)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["error"] == "RuntimeError: reward model crashed"
    assert shown["checkpoint"] == f"{tmp_path}/alpha/checkpoints/fit/epoch-0001"

    assert runs.main(["show", "gamma", "--output-dir", str(tmp_path)]) == 1
    assert "no run named 'gamma'" in capsys.readouterr().err


def test_unreachable_redis_at_submit_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(REDIS_URL_ENV, f"redis://:hunter2@127.0.0.1:{free_port()}/0")  # nothing listens there
    config = load_config("configs/tiny.yaml", [f"run.output_dir={tmp_path}", "run.name=x"])
    with pytest.raises(ConfigError) as error:
        registered_run_uri(config)
    message = str(error.value)
    assert message.startswith(f"{REDIS_URL_ENV}: cannot reach the run registry") and "\n" not in message
    assert "hunter2" not in message  # the password never reaches a log


def test_role_resources_are_validated_and_counted():
    from dense_rl.config.layout import placed

    config = load_config(None, ["cluster.rollout_resource=rollout", "cluster.learner_resource=learner",
                                "cluster.num_rollout_workers=3", "cluster.num_learner_workers=2"])
    needed = placed(config, cluster_cpus=2).cluster.resources_needed()
    assert needed["rollout"] == 3 and needed["learner"] == 2 and "reward" not in needed
    assert config.cluster.custom_resources("rollout") == {"rollout": 1.0}
    assert config.cluster.custom_resources("reward") == {}
    for bad in ("GPU", "two words", "{rollout: 1}"):
        with pytest.raises(ConfigError, match=r"^cluster.reward_resource: "):
            load_config(None, [f"cluster.reward_resource={bad}"])
