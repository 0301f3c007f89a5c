"""A multi-node Ray cluster on one machine, for trying placement locally: a head that keeps no work
and two worker nodes, each advertising its own custom resource, so each role lands on its own node.

    python cluster/local_cluster.py up   --temp-dir /tmp/rl-local        # prints the address
    python -m dense_rl.launch --config cluster/local_multinode.yaml --set cluster.address=127.0.0.1:6390
    python cluster/local_cluster.py down --temp-dir /tmp/rl-local

Nodes (the `cluster.*_resource` options of dense_rl's config pick them):

    head      num-cpus 0                                  drivers, GCS, dashboard; no actors
    rollout   num-cpus 2, resources {"rollout": 2}        RolloutWorker actors
    learner   num-cpus 3, resources {"learner": 2, "reward": 1}   learner group + RewardWorker

Every node gets its own ports (free ones, picked here) and all share --temp-dir; `down` stops exactly
the processes that name that temp dir, so other Ray clusters on the machine are left alone (unlike
`ray stop`). The cluster listens on 127.0.0.1 only and runs without Ray's token authentication.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

STATE_FILE = "local_cluster.json"
WORKER_NODES = {
    "rollout": {"num_cpus": 2, "resources": {"rollout": 2}},
    "learner": {"num_cpus": 3, "resources": {"learner": 2, "reward": 1}},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_environment() -> dict:
    # Jobs and actors run the `python` first on PATH when the node starts: this one.
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "disabled"}


def node_ports() -> list[str]:
    """Ports that default to fixed numbers (and so collide between nodes on one machine)."""
    return [
        f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
        f"--metrics-export-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
    ]


def ray_start(arguments: list[str]) -> None:
    ray = Path(sys.executable).parent / "ray"
    result = subprocess.run([str(ray), "start", "--node-ip-address=127.0.0.1", "--disable-usage-stats", *arguments],
                            env=ray_environment(), capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise SystemExit(f"ray start failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")


def up(temp_dir: Path, port: int, dashboard_port: int) -> dict:
    temp_dir.mkdir(parents=True, exist_ok=True)
    ray_start(["--head", f"--port={port}", f"--temp-dir={temp_dir}", "--num-cpus=0",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
               f"--ray-client-server-port={free_port()}", *node_ports()])
    address = f"127.0.0.1:{port}"
    for name, node in WORKER_NODES.items():
        ray_start([f"--address={address}", f"--temp-dir={temp_dir}", f"--num-cpus={node['num_cpus']}",
                   f"--resources={json.dumps(node['resources'])}", *node_ports()])
    state = {"address": address, "dashboard": f"http://127.0.0.1:{dashboard_port}", "temp_dir": str(temp_dir),
             "nodes": {"head": {"num_cpus": 0, "resources": {}}, **WORKER_NODES}}
    (temp_dir / STATE_FILE).write_text(json.dumps(state, indent=1))
    wait_for_nodes(address, 1 + len(WORKER_NODES))
    return state


def wait_for_nodes(address: str, count: int, timeout_s: float = 120.0) -> None:
    """`ray start` returns before a worker node has registered with the head; wait until all have."""
    script = "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); " \
             "print(sum(n['Alive'] for n in ray.nodes()))"
    deadline = time.monotonic() + timeout_s
    while True:
        result = subprocess.run([sys.executable, "-c", script, address], env=ray_environment(),
                                capture_output=True, text=True, timeout=120)
        if result.returncode == 0 and int(result.stdout.split()[-1]) >= count:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"only {result.stdout.strip() or 0} of {count} nodes joined: {result.stderr[-1000:]}")
        time.sleep(1.0)


def down(temp_dir: Path) -> int:
    """Stop the processes of this cluster only: the ones whose command line names its temp dir."""
    import psutil

    state_file = temp_dir / STATE_FILE
    if state_file.is_file():
        port = json.loads(state_file.read_text())["address"].rsplit(":", 1)[1]
        for current in (Path("/tmp/ray/ray_current_cluster"), temp_dir / "ray_current_cluster"):
            # `ray start --head` records its address here for a bare ray.init(); forget ours.
            if current.is_file() and current.read_text().strip().endswith(f":{port}"):
                current.unlink()
    stopped = 0
    for process in psutil.process_iter(["cmdline"]):
        try:
            if process.pid != os.getpid() and any(str(temp_dir) in part for part in process.info["cmdline"] or []):
                process.kill()
                stopped += 1
        except psutil.Error:
            pass
    return stopped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down"])
    parser.add_argument("--temp-dir", default="/tmp/rl-local",
                        help="this cluster's own Ray temp dir (short: Ray's socket paths must fit 107 bytes)")
    parser.add_argument("--port", type=int, default=6390, help="the head's GCS port")
    parser.add_argument("--dashboard-port", type=int, default=8275)
    args = parser.parse_args(argv)
    temp_dir = Path(args.temp_dir).resolve()
    if args.command == "up":
        state = up(temp_dir, args.port, args.dashboard_port)
        print(f"Ray cluster up: address {state['address']}, dashboard {state['dashboard']}")
        print(f"  python -m dense_rl.launch --config cluster/local_multinode.yaml --set cluster.address={state['address']}")
        print(f"  RAY_AUTH_MODE=disabled ray job submit --address {state['dashboard']} --working-dir . -- python -m dense_rl.launch ...")
        return 0
    print(f"stopped {down(temp_dir)} processes of the cluster in {temp_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
