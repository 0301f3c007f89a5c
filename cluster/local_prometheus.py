"""Start a local Prometheus (Debian's `prometheus` package) that scrapes the Ray instance on this machine.

    python cluster/local_prometheus.py                  # http://127.0.0.1:9090, data in ~/.cache/dense_rl/prometheus
    python cluster/local_prometheus.py --port 9091 --ray-temp-dir /tmp/myray --storage /tmp/prom

It runs deploy/prometheus/prometheus.yml with its rules, pointed at Ray's service-discovery file
(`<Ray temp dir>/prom_metrics_service_discovery.json`: Ray's head keeps it up to date with every
node's metrics port; the default temp dir is /tmp/ray, or $RAY_TMPDIR/ray). Start Ray first or after:
the file is re-read as it changes. Then import dashboards/dense_rl.json into Grafana with this
Prometheus (http://127.0.0.1:9090) as its data source; see README.md, "Watch it in Grafana".
Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "deploy/prometheus/prometheus.yml"
RULES = REPO / "deploy/prometheus/dense_rl.rules.yml"
SD_FILE = "prom_metrics_service_discovery.json"


def default_ray_temp_dir() -> str:
    """Ray's own rule: $RAY_TMPDIR (or $TMPDIR on Linux, else /tmp), then `ray`."""
    base = os.environ.get("RAY_TMPDIR") or (os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None)
    return os.path.join(base or "/tmp", "ray")


def render_config(service_discovery_file: str, scrape_interval: str | None = None) -> dict:
    """deploy/prometheus/prometheus.yml, with Ray's service-discovery file and absolute rule paths."""
    config = yaml.safe_load(CONFIG.read_text())
    config["rule_files"] = [str((CONFIG.parent / rule).resolve()) for rule in config.get("rule_files", [])]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "ray"]
    job["file_sd_configs"] = [{"files": [service_discovery_file], "refresh_interval": scrape_interval or "30s"}]
    if scrape_interval:
        config["global"].update(scrape_interval=scrape_interval, evaluation_interval=scrape_interval)
    return config


def start(port: int, storage: str, ray_temp_dir: str, scrape_interval: str | None = None,
          host: str = "127.0.0.1", log_file=None) -> subprocess.Popen:
    """Write the config into `storage` and start Prometheus; returns once its HTTP API answers."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise SystemExit("error: no `prometheus` on PATH; install it with `apt-get install prometheus` (Debian/Ubuntu)")
    os.makedirs(storage, exist_ok=True)
    os.makedirs(ray_temp_dir, exist_ok=True)  # Prometheus watches the folder for the file Ray will write
    config_file = os.path.join(storage, "prometheus.yml")
    with open(config_file, "w") as out:
        yaml.safe_dump(render_config(os.path.join(ray_temp_dir, SD_FILE), scrape_interval), out, sort_keys=False)
    process = subprocess.Popen(
        [binary, f"--config.file={config_file}", f"--web.listen-address={host}:{port}",
         f"--storage.tsdb.path={os.path.join(storage, 'data')}", "--web.enable-lifecycle"],
        stdout=log_file or subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return process
        except OSError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited with status {process.returncode}; is port {port} free?")
        if time.monotonic() > deadline:
            process.terminate()
            raise RuntimeError(f"prometheus did not answer on {host}:{port} within 60 s")
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python cluster/local_prometheus.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=9090, help="HTTP port (default 9090)")
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    parser.add_argument("--ray-temp-dir", default=default_ray_temp_dir(),
                        help="Ray's temp dir, holding prom_metrics_service_discovery.json (default: %(default)s)")
    parser.add_argument("--storage", default=os.path.expanduser("~/.cache/dense_rl/prometheus"),
                        help="config and TSDB folder (default: %(default)s)")
    parser.add_argument("--scrape-interval", default=None, help="e.g. 5s (default: the config's 10s)")
    args = parser.parse_args(argv)
    process = start(args.port, args.storage, args.ray_temp_dir, args.scrape_interval, host=args.host)
    print(f"Prometheus on http://{args.host}:{args.port}, scraping Ray through "
          f"{os.path.join(args.ray_temp_dir, SD_FILE)}; Ctrl-C stops it")
    # Ctrl-C or a plain `kill` of this script stops Prometheus with it (no orphan holding the port).
    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.terminate()
        process.wait(timeout=30)
        return 0


if __name__ == "__main__":
    sys.exit(main())
