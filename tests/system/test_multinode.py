"""cluster/: the local multi-node script (a head plus two worker nodes on this machine; a short job whose
roles land on different nodes through the cluster.*_resource options) and the cloud launcher YAML."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml

from dense_rl.config import load_config
from dense_rl.run.storage import RunDir
from dense_rl.system.session import run_system
from support.servers import free_port

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "cluster" / "local_cluster.py"


@pytest.mark.slow
def test_roles_run_on_their_own_nodes(tmp_path):
    temp_dir = Path("/tmp") / f"rl-mn-{os.getpid()}"  # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    try:
        subprocess.run([sys.executable, SCRIPT, "up", "--temp-dir", temp_dir, "--port", str(port),
                        "--dashboard-port", str(free_port())], check=True, capture_output=True, timeout=600)
        state = json.loads((temp_dir / "local_cluster.json").read_text())
        assert state["address"] == f"127.0.0.1:{port}"

        config = load_config("cluster/local_multinode.yaml", [
            f"cluster.address=127.0.0.1:{port}", f"run.output_dir={tmp_path}", "run.name=multinode",
            "run.num_epochs=1", "sample.batch_size=4", "sample.num_batches_per_epoch=2",
        ])
        placements = {}

        def record_placement(driver, metrics):
            import ray
            from ray.util.state import list_actors

            nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
            placements["nodes"] = nodes
            for actor in list_actors(address=state["address"], filters=[("state", "=", "ALIVE")], limit=1000):
                placements.setdefault(actor.class_name, []).append(actor.node_id)

        run_system(config, f"{tmp_path}/multinode", show_progress=False, on_epoch=record_placement)
    finally:
        subprocess.run([sys.executable, SCRIPT, "down", "--temp-dir", temp_dir], capture_output=True, timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)

    nodes = placements["nodes"]
    assert len(nodes) == 3
    (head,) = [node for node, resources in nodes.items() if resources.get("CPU", 0) == 0]
    rollout_nodes = set(placements["RolloutWorker"])
    learner_nodes = set(placements["RayTrainWorker"])
    reward_nodes = set(placements["RewardWorker"])
    assert len(placements["RolloutWorker"]) == 2 and len(placements["RayTrainWorker"]) == 2
    assert len(rollout_nodes) == 1 and all("rollout" in nodes[n] for n in rollout_nodes)
    assert len(learner_nodes) == 1 and all("learner" in nodes[n] for n in learner_nodes)
    assert reward_nodes == learner_nodes  # the learner node also advertises "reward"
    assert rollout_nodes.isdisjoint(learner_nodes) and head not in rollout_nodes | learner_nodes
    assert RunDir(f"{tmp_path}/multinode").latest_checkpoint()["epoch"] == 1
    # Nothing of this cluster is left running.
    import psutil

    assert not [p for p in psutil.process_iter(["cmdline"]) if any(str(temp_dir) in a for a in p.info["cmdline"] or [])]


def test_cloud_launcher_yaml_is_valid_and_fits_the_sd15_run():
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    launcher = yaml.safe_load((REPO / "cluster/gpu-aws.yaml").read_text())
    jsonschema.validate(launcher, schema)  # Ray's own schema for `ray up`, which rejects unknown keys
    typo = copy.deepcopy(launcher)
    typo["available_node_types"]["rollout"]["max_worker"] = typo["available_node_types"]["rollout"].pop("max_workers")
    with pytest.raises(jsonschema.ValidationError, match="'max_worker' was unexpected"):
        jsonschema.validate(typo, schema)

    assert launcher["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")
    node_types = launcher["available_node_types"]
    assert node_types[launcher["head_node_type"]]["resources"] == {"CPU": 0}  # the head keeps no work
    config = load_config("configs/sd15-jpeg.yaml", [f"cluster.{r}_resource={r}" for r in ("rollout", "reward", "learner")])
    for role in ("rollout", "reward", "learner"):
        (node,) = [n for n in node_types.values() if role in n["resources"]]
        cluster = config.cluster
        per_node = node["resources"][role]
        assert node["resources"]["CPU"] >= getattr(cluster, f"{role}_cpus") * per_node, role
        assert node["resources"].get("GPU", 0) >= math.ceil(getattr(cluster, f"{role}_gpus")) * per_node, role
        assert node["max_workers"] * per_node >= getattr(cluster, f"num_{role}_workers"), role
        assert node.get("min_workers", 0) <= node["max_workers"]
