"""Observability: a short run on the embedded model is scraped from Ray by a real Prometheus, and every
query of every panel of dashboards/dense_rl.json returns data; the Prometheus config and rules pass
promtool (including the rules' own unit tests); the dashboard and Grafana provisioning are consistent."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from dense_rl.system.telemetry import METRICS
from support.servers import free_port

REPO = Path(__file__).resolve().parents[2]
PROMTOOL = shutil.which("promtool")
needs_prometheus = pytest.mark.skipif(PROMTOOL is None or shutil.which("prometheus") is None,
                                      reason="prometheus/promtool not installed (.ci/run installs Debian's package)")
ROWS = ["Throughput", "Learning", "Credit assignment", "Guards", "Learner", "Weight sync", "Cluster"]


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


local_prometheus = load_module(REPO / "cluster/local_prometheus.py")
build_dashboard = load_module(REPO / "dashboards/build_dashboard.py")


def dashboard() -> dict:
    return json.loads((REPO / "dashboards/dense_rl.json").read_text())


def panel_queries(board: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel."""
    return [(p["title"], t["expr"]) for p in board["panels"] if p["type"] != "row" for t in p["targets"]]


def exported_names() -> list[str]:
    """The names Prometheus sees: Ray adds `ray_`, counters get `_total`, histograms `_count` (and more)."""
    suffix = {"counter": "_total", "gauge": "", "histogram": "_count"}
    return [f"ray_{name}{suffix[kind]}" for name, (kind, _, _) in METRICS.items()]


# ---------------------------------------------------------------------- fast checks


@needs_prometheus
def test_promtool_accepts_config_and_rules(tmp_path):
    folder = REPO / "deploy/prometheus"
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "dense_rl.rules.yml"],
                 ["test", "rules", "dense_rl.rules.test.yml"]):
        done = subprocess.run([PROMTOOL, *args], cwd=folder, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}{done.stderr}"
    # The config cluster/local_prometheus.py writes (absolute rule path, another Ray temp dir) is valid too.
    rendered = tmp_path / "prometheus.yml"
    rendered.write_text(yaml.safe_dump(local_prometheus.render_config(str(tmp_path / "sd.json"), "2s")))
    done = subprocess.run([PROMTOOL, "check", "config", str(rendered)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_is_built_from_its_generator():
    assert build_dashboard.main(["--check"]) == 0, "run python dashboards/build_dashboard.py"


def test_dashboard_shape():
    board = dashboard()
    assert board["uid"] == "dense-rl"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["session"]["type"] == "query" and "SessionName" in variables["session"]["definition"]
    assert [p["title"] for p in board["panels"] if p["type"] == "row"] == ROWS
    for p in board["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["fieldConfig"]["defaults"].get("unit"), f"{p['title']}: no unit"
        for target in p["targets"]:
            assert target["legendFormat"], f"{p['title']}: no legend"
            assert 'SessionName=~"$session"' in target["expr"], f"{p['title']}: not filtered by session"
            # Every range selector of a rate/increase is the rate interval Grafana computes.
            assert set(re.findall(r"\[([^\]]+)\]", target["expr"])) <= {"$__rate_interval"}, target["expr"]
    # Every metric dense_rl exports is on the dashboard.
    text = json.dumps(board)
    for name in METRICS:
        assert f"ray_{name}" in text, f"{name} is on no panel"


def test_grafana_provisioning_points_at_the_dashboard():
    folder = REPO / "deploy/grafana/provisioning"
    (source,) = yaml.safe_load((folder / "datasources/prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://127.0.0.1:9090" and source["isDefault"]
    (provider,) = yaml.safe_load((folder / "dashboards/dense_rl.yml").read_text())["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == "$DENSE_RL_DASHBOARDS"


# ---------------------------------------------------------------------- end to end


class Prometheus:
    def __init__(self, port: int):
        self.url = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params) -> dict:
        with urllib.request.urlopen(f"{self.url}{path}?{urllib.parse.urlencode(params, doseq=True)}", timeout=30) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.get("/api/v1/query", query=expr)["result"]


def has_data(result: list[dict]) -> bool:
    return any(math.isfinite(float(series["value"][1])) for series in result)


def query_until_data(api: Prometheus, expr: str, seconds: float = 15.0) -> list[dict]:
    """The query's result, asked again for a few seconds while it is empty: Ray's node stats arrive
    every second or so, and a busy machine can leave a scrape without them."""
    deadline = time.monotonic() + seconds
    while True:
        result = api.query(expr)
        if has_data(result) or time.monotonic() > deadline:
            return result
        time.sleep(1)


@pytest.mark.slow
@needs_prometheus
def test_every_dashboard_panel_has_data_from_a_real_run(tmp_path, monkeypatch):
    from dense_rl.config import load_config
    from dense_rl.system.session import run_system

    ray_tmp = tempfile.mkdtemp(prefix="drl-obs-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)  # a private Ray temp dir, hence a private service-discovery file
    # Ray's agents report every 10 s (node stats every 5 s) by default: too slow for a test. A gauge
    # lives 2 report intervals in the agent, so node stats must come faster than that.
    monkeypatch.setenv("RAY_metrics_report_interval_ms", "2000")
    monkeypatch.setenv("REPORTER_UPDATE_INTERVAL_MS", "1000")
    port = free_port()
    log = open(tmp_path / "prometheus.log", "wb")
    prometheus = local_prometheus.start(port, str(tmp_path / "prometheus"), os.path.join(ray_tmp, "ray"),
                                        scrape_interval="1s", log_file=log)
    api = Prometheus(port)
    num_epochs = 3
    config = load_config("configs/tiny.yaml", [
        "cluster.address=local", f"run.output_dir={tmp_path}", "run.name=observed", f"run.num_epochs={num_epochs}",
        "cluster.num_rollout_workers=1", "cluster.num_reward_workers=1", "cluster.num_learner_workers=1",
        "sample.num_steps=10", "sample.batch_size=8", "sample.num_batches_per_epoch=2", "train.batch_size=8",
        # A held-out evaluation after every epoch, for the Guards row.
        "evaluation.every_epochs=1", "evaluation.max_prompts=8", "evaluation.batch_size=8",
        "evaluation.rewards=[digit_alignment]",
    ])
    answers: dict = {}

    def query_everything(driver, metrics):
        if metrics["epoch"] + 1 < num_epochs:
            return
        # Ray is still up: wait until Prometheus has scraped the final epoch, then ask every query.
        deadline = time.monotonic() + 60
        while not any(float(s["value"][1]) == num_epochs for s in api.query("ray_dense_rl_epoch")):
            assert time.monotonic() < deadline, "the final epoch never reached Prometheus"
            time.sleep(1)
        time.sleep(3)  # a few more scrapes, so every rate has two fresh points
        sessions = api.get("/api/v1/label/SessionName/values", **{"match[]": "ray_dense_rl_policy_lag_bound"})
        answers["sessions"] = sessions
        session = sessions[0]
        answers["names"] = {n: api.query(f'{n}{{SessionName="{session}"}}') for n in exported_names()}
        answers["panels"] = [(title, expr, query_until_data(api, expr.replace("$session", session)
                                                             .replace("$__rate_interval", "1m")))
                             for title, expr in panel_queries(dashboard())]
        answers["record"] = api.query(f'dense_rl:trajectories_per_second:rate5m{{SessionName="{session}"}}')
        answers["alerts"] = api.get("/api/v1/alerts")["alerts"]
        answers["rules"] = api.get("/api/v1/rules")["groups"]

    started = time.monotonic()
    try:
        run_system(config, f"{tmp_path}/observed", show_progress=False, on_epoch=query_everything)
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    print(f"run and queries: {time.monotonic() - started:.0f} s")

    assert len(answers["sessions"]) == 1, answers["sessions"]  # the dashboard's session variable: this run
    missing = [name for name, result in answers["names"].items() if not result]
    assert not missing, f"exported metrics Prometheus never saw: {missing}"
    empty = [f"{title}: {expr}" for title, expr, result in answers["panels"] if not has_data(result)]
    assert not empty, "panels whose query returns no data:\n" + "\n".join(empty)
    assert has_data(answers["record"]), "the recording rules did not evaluate"
    assert {g["name"] for g in answers["rules"]} == {"dense_rl.records", "dense_rl.alerts"}
    assert [a for a in answers["alerts"] if a["state"] == "firing"] == []  # a healthy run raises no alert
