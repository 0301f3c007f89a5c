"""Every overlay of deploy/kuberay is built with stock kustomize (`kubectl kustomize`, no flags) and every
object it renders is validated: RayJob/RayCluster against KubeRay's v1.7.0 CRD schemas with unknown fields
rejected, core kinds with kubernetes-validate, the Prometheus Operator kinds against a strict subset of
their schemas, the PrometheusRule's groups with promtool (and the rules' unit tests); plus what no schema
knows (replica bounds, GPUs, the entrypoint and its config, secrets, the dashboard ConfigMap)."""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import math
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import ray
import yaml

from dense_rl.config import Config, load_config
from dense_rl.config.layout import placed
from support.kuberay_schemas import validation_errors

REPO = Path(__file__).resolve().parents[2]
KUBERAY = REPO / "deploy/kuberay"
# (what runs, hardware): a RayJob or a RayCluster, on CPU or GPU; one overlay each.
OVERLAYS = {"job-cpu": ("RayJob", "cpu"), "job-gpu": ("RayJob", "gpu"),
            "cluster-cpu": ("RayCluster", "cpu"), "cluster-gpu": ("RayCluster", "gpu")}
IMAGES = {"cpu": "dense-rl:cpu", "gpu": "registry.example.com/dense-rl:0.1.0-gpu"}
SHARED_KINDS = ["ConfigMap", "Deployment", "PersistentVolumeClaim", "PodMonitor", "PrometheusRule", "Service"]
IMAGE_WORKDIR = "/home/ray/dense_rl"  # WORKDIR in deploy/Dockerfile: the repository's root in the image
ROLES = ("rollout", "reward", "learner")


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_dashboard = load_module(REPO / "dashboards/build_dashboard.py")
build_prometheusrule = load_module(REPO / "deploy/prometheus/build_prometheusrule.py")


def kustomize_command() -> list[str]:
    """Stock kustomize as users run it: kubectl's built-in one, else the standalone binary. A missing
    binary fails the tests (never skips them): these manifests are only tested if they are built."""
    if kubectl := shutil.which("kubectl"):
        return [kubectl, "kustomize"]
    if kustomize := shutil.which("kustomize"):
        return [kustomize, "build"]
    pytest.fail("kubectl not found on PATH: tests/deploy/test_kuberay.py builds deploy/kuberay/overlays/* with "
                "`kubectl kustomize` (or `kustomize build`); install kubectl", pytrace=False)


@functools.cache
def kustomize_output(folder: Path) -> str:
    done = subprocess.run([*kustomize_command(), str(folder)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(kustomize_command())} {folder} failed:\n{done.stderr}"
    return done.stdout


def build(overlay: str) -> list[dict]:
    """The objects `kubectl apply -k deploy/kuberay/overlays/OVERLAY` would apply (a fresh copy each call)."""
    return [doc for doc in yaml.safe_load_all(kustomize_output(KUBERAY / "overlays" / overlay)) if doc]


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found on PATH: install Prometheus (Debian: apt-get install prometheus; "
                    ".ci/run does)", pytrace=False)
    return path


# ---------------------------------------------------------------------- what the schemas cannot check


def entrypoint_config(entrypoint: str) -> tuple[str, Config]:
    """The module an entrypoint runs and the dense_rl config it would load (from this repository)."""
    words = shlex.split(entrypoint)
    assert words[:2] == ["python", "-m"], entrypoint
    config_path, overrides = None, []
    for flag, value in zip(words[3:], words[4:]):
        if flag == "--config":
            config_path = value
        elif flag == "--set":
            overrides.append(value)
    if config_path is not None and config_path.startswith(IMAGE_WORKDIR + "/"):
        config_path = str(REPO / config_path[len(IMAGE_WORKDIR) + 1:])
    return words[2], placed(load_config(config_path, overrides), cluster_cpus=0)  # an autoscaling cluster starts empty


def custom_resources(group: dict) -> dict[str, float]:
    """rayStartParams.resources, written as KubeRay documents it: a JSON string holding a JSON object."""
    text = group.get("rayStartParams", {}).get("resources")
    if text is None:
        return {}
    value = json.loads(text)
    return json.loads(value) if isinstance(value, str) else value


def cluster_problems(spec: dict, config: Config) -> list[str]:
    """Cross-checks of a RayCluster spec against the run config it will carry."""
    problems = []
    if spec["headGroupSpec"]["rayStartParams"].get("num-cpus") != "0":
        problems.append("headGroupSpec: the head must keep no work (rayStartParams num-cpus: \"0\")")
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append("enableInTreeAutoscaling must be true")
    if spec.get("authOptions", {}).get("mode") != "token":
        problems.append("authOptions.mode must be token (the dashboard and GCS are reachable in the cluster)")
    if spec.get("rayVersion") != ray.__version__:
        problems.append(f"rayVersion {spec.get('rayVersion')} != installed Ray {ray.__version__}")
    cluster = config.cluster
    covered = set()
    for group in spec["workerGroupSpecs"]:
        name = group["groupName"]
        low, high = group["minReplicas"], group["maxReplicas"]
        if low > high:
            problems.append(f"{name}: minReplicas {low} > maxReplicas {high}")
        if "replicas" in group and not low <= group["replicas"] <= high:
            problems.append(f"{name}: replicas {group['replicas']} outside [{low}, {high}]")
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        limits = container.get("resources", {}).get("limits", {})
        requests = container.get("resources", {}).get("requests", {})
        gpus = float(limits.get("nvidia.com/gpu", 0))
        if "nvidia.com/gpu" in requests and requests["nvidia.com/gpu"] != limits.get("nvidia.com/gpu"):
            problems.append(f"{name}: nvidia.com/gpu requests need equal limits")
        if gpus > 0 and not (pod.get("nodeSelector") and pod.get("tolerations")):
            problems.append(f"{name}: GPU group without nodeSelector and tolerations for GPU nodes")
        ray_cpus = float(group["rayStartParams"].get("num-cpus", limits.get("cpu", 0)))
        units = custom_resources(group)
        for role in ROLES:
            resource = getattr(cluster, f"{role}_resource")
            if resource not in units:
                continue
            covered.add(role)
            per_actor_gpus = getattr(cluster, f"{role}_gpus")
            if per_actor_gpus > 0 and gpus < math.ceil(per_actor_gpus):
                problems.append(f"{name}: {role} actors need {per_actor_gpus} GPU but the pods' limits have {gpus}")
            if ray_cpus < getattr(cluster, f"{role}_cpus"):
                problems.append(f"{name}: {role} actors need {getattr(cluster, f'{role}_cpus')} CPUs, pods have {ray_cpus}")
            actors = getattr(cluster, f"num_{role}_workers")
            if high * units[resource] < actors:
                problems.append(f"{name}: maxReplicas {high} x {units[resource]} {resource} < {actors} {role} actors")
    for role in ROLES:
        if role not in covered:
            problems.append(f"no worker group offers cluster.{role}_resource={getattr(cluster, f'{role}_resource')!r}")
    return problems


def rayjob_problems(job: dict) -> list[str]:
    module, config = entrypoint_config(job["spec"]["entrypoint"])
    problems = [] if importlib.util.find_spec(module) else [f"entrypoint: module {module} does not exist"]
    return problems + cluster_problems(job["spec"]["rayClusterSpec"], config)


def walk(node, path=""):
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}/{i}")


# ---------------------------------------------------------------------- tests


@pytest.fixture(scope="module", params=sorted(OVERLAYS))
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, build(request.param)


def by_kind(objects: list[dict], kind: str) -> dict:
    (obj,) = [o for o in objects if o["kind"] == kind]
    return obj


def ray_cluster_spec(obj: dict) -> dict:
    return obj["spec"].get("rayClusterSpec", obj["spec"])


def test_the_overlays_are_job_and_cluster_on_cpu_and_gpu():
    # A new overlay must be added to OVERLAYS, so that it is tested too.
    assert sorted(p.parent.name for p in KUBERAY.glob("overlays/*/kustomization.yaml")) == sorted(OVERLAYS)


def test_every_rendered_manifest_is_valid(rendered):
    name, objects = rendered
    ray_kind, _ = OVERLAYS[name]
    assert sorted(o["kind"] for o in objects) == sorted([*SHARED_KINDS, ray_kind])
    for obj in objects:
        assert obj["metadata"]["namespace"] == "dense-rl", f"{name}: {obj['kind']}"
        assert validation_errors(obj) == [], f"{name}: {obj['kind']} {obj['metadata']['name']}"


@pytest.mark.parametrize("hardware", ["cpu", "gpu"])
def test_ray_clusters_fit_the_runs_they_carry(hardware):
    job, cluster = by_kind(build(f"job-{hardware}"), "RayJob"), by_kind(build(f"cluster-{hardware}"), "RayCluster")
    assert rayjob_problems(job) == []
    # `ray job submit` onto the interactive cluster runs the same config as the job (README, step 8).
    _, config = entrypoint_config(job["spec"]["entrypoint"])
    assert cluster_problems(cluster["spec"], config) == []
    # The interactive RayCluster is the RayJob's cluster plus GCS fault tolerance.
    cluster_spec = copy.deepcopy(cluster["spec"])
    fault_tolerance = cluster_spec.pop("gcsFaultToleranceOptions")
    assert cluster_spec == job["spec"]["rayClusterSpec"]
    assert fault_tolerance["redisAddress"] == "dense-rl-redis:6379"
    assert fault_tolerance["redisPassword"] == {"valueFrom": {"secretKeyRef": {"name": "dense-rl-redis", "key": "password"}}}
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpu_groups = {g["groupName"] for g in groups if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]}
    if hardware == "gpu":
        assert config.model.device == "cuda"
        assert gpu_groups == {"rollout", "learner"}
    else:
        assert config.model.device == "cpu" and gpu_groups == set()
    # kustomize's images transformer reaches the containers inside the CRDs, too.
    for obj in (job, cluster):
        spec = ray_cluster_spec(obj)
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            assert [c["image"] for c in group["template"]["spec"]["containers"]] == [IMAGES[hardware]]
    # A one-node demo cluster shares a ReadWriteOnce volume; GPU clusters need ReadWriteMany.
    volume = by_kind(build(f"job-{hardware}"), "PersistentVolumeClaim")
    assert volume["spec"]["accessModes"] == (["ReadWriteOnce"] if hardware == "cpu" else ["ReadWriteMany"])


def test_no_secret_in_any_manifest_and_metrics_are_wired(rendered):
    name, objects = rendered
    assert "Secret" not in {o["kind"] for o in objects}
    for obj in objects:
        for path, node in walk(obj):
            if isinstance(node, dict) and re.search("password", str(node.get("name", "")) + path.rsplit("/", 1)[-1], re.I):
                assert "value" not in node and "secretKeyRef" in node.get("valueFrom", {}), f"{obj['kind']}{path}"
    # The PodMonitor selects every Ray pod, and each Ray container names the port it scrapes.
    monitor = by_kind(objects, "PodMonitor")["spec"]
    port = monitor["podMetricsEndpoints"][0]["port"]
    spec = ray_cluster_spec(by_kind(objects, OVERLAYS[name][0]))
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        labels = {**group["template"]["metadata"]["labels"], "ray.io/is-ray-node": "yes"}  # KubeRay adds the latter
        assert monitor["selector"]["matchLabels"].items() <= labels.items()
        assert port in [p["name"] for p in group["template"]["spec"]["containers"][0]["ports"]]
    dashboard = by_kind(objects, "ConfigMap")
    assert dashboard["metadata"]["labels"] == {"grafana_dashboard": "1"}
    (text,) = dashboard["data"].values()
    assert json.loads(text) == json.loads((REPO / "dashboards/dense_rl.json").read_text())
    assert json.loads(text)["uid"] == "dense-rl"
    # The PrometheusRule holds exactly the groups plain Prometheus loads.
    rule = by_kind(objects, "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load((REPO / "deploy/prometheus/dense_rl.rules.yml").read_text())["groups"]


def test_generated_copies_in_the_kustomize_tree_are_up_to_date():
    assert build_dashboard.main(["--check"]) == 0, "run python dashboards/build_dashboard.py"
    assert build_prometheusrule.main(["--check"]) == 0, "run python deploy/prometheus/build_prometheusrule.py"
    (text,) = by_kind(build("job-gpu"), "ConfigMap")["data"].values()
    assert text == build_dashboard.render()


def test_rendered_prometheus_rule_passes_promtool(tmp_path):
    groups = [by_kind(build(name), "PrometheusRule")["spec"]["groups"] for name in sorted(OVERLAYS)]
    assert all(g == groups[0] for g in groups)
    # promtool reads plain rule files: the groups alone, beside a copy of the rules' unit tests,
    # whose rule_files entry names dense_rl.rules.yml in the same folder.
    (tmp_path / "dense_rl.rules.yml").write_text(yaml.safe_dump({"groups": groups[0]}, sort_keys=False))
    shutil.copy(REPO / "deploy/prometheus/dense_rl.rules.test.yml", tmp_path)
    for args in (["check", "rules", "dense_rl.rules.yml"], ["test", "rules", "dense_rl.rules.test.yml"]):
        done = subprocess.run([promtool(), *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}{done.stderr}"


def test_typos_and_impossible_clusters_are_caught():
    objects = build("job-gpu")
    job = by_kind(objects, "RayJob")

    typo = copy.deepcopy(job)
    group = typo["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    group["maxReplica"] = group.pop("maxReplicas")
    errors = validation_errors(typo)
    assert any("'maxReplica' was unexpected" in e for e in errors), errors
    assert any("'maxReplicas' is a required property" in e for e in errors), errors

    nested = copy.deepcopy(job)
    nested["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["nodeSelecter"] = {"a": "b"}
    assert any("nodeSelecter" in e for e in validation_errors(nested))

    deployment = copy.deepcopy(by_kind(objects, "Deployment"))
    deployment["spec"]["replica"] = 1
    assert validation_errors(deployment)

    rule = copy.deepcopy(by_kind(objects, "PrometheusRule"))
    rule["spec"]["groups"][1]["rules"][0]["expression"] = rule["spec"]["groups"][1]["rules"][0].pop("expr")
    assert any("'expression' was unexpected" in e for e in validation_errors(rule))

    inverted = copy.deepcopy(job)
    inverted["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["minReplicas"] = 9
    assert "rollout: minReplicas 9 > maxReplicas 8" in rayjob_problems(inverted)

    no_gpu = copy.deepcopy(job)
    del no_gpu["spec"]["rayClusterSpec"]["workerGroupSpecs"][2]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    problems = rayjob_problems(no_gpu)
    assert "learner: learner actors need 1.0 GPU but the pods' limits have 0.0" in problems
    assert "learner: nvidia.com/gpu requests need equal limits" in problems

    wrong_module = copy.deepcopy(job)
    wrong_module["spec"]["entrypoint"] = wrong_module["spec"]["entrypoint"].replace("dense_rl.launch", "dense_rl.lunch")
    assert "entrypoint: module dense_rl.lunch does not exist" in rayjob_problems(wrong_module)

    too_few = copy.deepcopy(job)
    too_few["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] = 2
    too_few["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = 1
    too_few["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["minReplicas"] = 1
    assert "rollout: maxReplicas 2 x 1 rollout < 4 rollout actors" in rayjob_problems(too_few)


def test_without_kustomize_the_tests_fail_and_say_why(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(pytest.fail.Exception, match="kubectl not found on PATH"):
        kustomize_command()
    with pytest.raises(pytest.fail.Exception, match="promtool not found on PATH"):
        promtool()


def test_dockerfile_builds_on_the_pinned_ray():
    dockerfile = (REPO / "deploy/Dockerfile").read_text()
    (default_image,) = re.findall(r"^ARG RAY_IMAGE=(\S+)$", dockerfile, re.M)
    assert default_image.startswith(f"rayproject/ray:{ray.__version__}-")
    assert re.search(r"^FROM \$\{RAY_IMAGE\}$", dockerfile, re.M)
    assert f"ray=={ray.__version__}" in (REPO / "constraints.txt").read_text().split()
    installs = re.findall(r"pip install [^\n\\&]*", dockerfile)
    assert installs and all("-c constraints.txt" in line for line in installs)
    for copied in re.findall(r"^COPY \S+ (.+) \S+$", dockerfile, re.M):
        for source in copied.split():
            assert (REPO / source).exists(), source
