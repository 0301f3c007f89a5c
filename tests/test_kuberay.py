"""Every manifest the kustomize overlays render is validated: RayJob/RayCluster against KubeRay's v1.7.0
CRD schemas with unknown fields rejected, core kinds with kubernetes-validate, and what no schema
knows (replica bounds, GPUs, the entrypoint and its config, secrets, the dashboard ConfigMap)."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import re
import shlex
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml

from dense_rl.config import Config, load_config

REPO = Path(__file__).resolve().parent.parent
OVERLAYS = {"base": REPO / "deploy/kuberay/base", "cpu-demo": REPO / "deploy/kuberay/overlays/cpu-demo",
            "gpu": REPO / "deploy/kuberay/overlays/gpu"}
IMAGE_WORKDIR = "/home/ray/dense_rl"  # WORKDIR in deploy/Dockerfile: the repository's root in the image
ROLES = ("rollout", "reward", "learner")

_spec = importlib.util.spec_from_file_location("kuberay_render", REPO / "deploy/kuberay/render.py")
render_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render_module)


def crd_folder() -> Path:
    # CI: a clean clone with shared/ beside it; a git worktree sits one level deeper.
    for candidate in (REPO.parent / "shared/kuberay-crds", REPO.parent.parent / "shared/kuberay-crds"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"KubeRay CRDs not found in {REPO.parent / 'shared/kuberay-crds'}")


# ---------------------------------------------------------------------- schemas

OBJECT_META = {  # the root metadata, which CRD schemas leave open
    "type": "object", "additionalProperties": False, "required": ["name"],
    "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                   "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                   "annotations": {"type": "object", "additionalProperties": {"type": "string"}}},
}


def reject_unknown_fields(schema):
    """additionalProperties: false wherever a structural schema lists properties and says nothing
    about others (the API server would prune them silently); x-kubernetes-preserve-unknown-fields
    subtrees stay open."""
    if not isinstance(schema, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return schema
    schema = dict(schema)
    if "properties" in schema:
        schema["properties"] = {k: reject_unknown_fields(v) for k, v in schema["properties"].items()}
        schema.setdefault("additionalProperties", False)
    if isinstance(schema.get("additionalProperties"), dict):
        schema["additionalProperties"] = reject_unknown_fields(schema["additionalProperties"])
    if "items" in schema:
        schema["items"] = reject_unknown_fields(schema["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            schema[key] = [reject_unknown_fields(s) for s in schema[key]]
    return schema


def load_crd_validators() -> dict[tuple[str, str], jsonschema.Draft7Validator]:
    validators = {}
    for path in sorted(crd_folder().glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = reject_unknown_fields(version["schema"]["openAPIV3Schema"])
            schema["properties"]["metadata"] = OBJECT_META
            validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return validators


CRD_VALIDATORS = load_crd_validators()

# The PodMonitor fields used here (prometheus-operator's CRD is not vendored): a strict subset.
_STRINGS = {"type": "array", "items": {"type": "string"}}
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_RELABEL = {"type": "object", "additionalProperties": False,
            "properties": {"sourceLabels": _STRINGS, "targetLabel": {"type": "string"}, "regex": {"type": "string"},
                           "action": {"type": "string"}, "replacement": {"type": "string"}}}
PODMONITOR_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PodMonitor"}, "metadata": OBJECT_META,
        "spec": {"type": "object", "additionalProperties": False, "required": ["selector", "podMetricsEndpoints"], "properties": {
            "selector": {"type": "object", "additionalProperties": False, "properties": {"matchLabels": _STR_MAP}},
            "namespaceSelector": {"type": "object"},
            "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False, "required": ["port"],
                "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                               "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                               "relabelings": {"type": "array", "items": _RELABEL}}}},
        }},
    },
}


def validation_errors(obj: dict) -> list[str]:
    """Schema errors of one rendered object, as 'path: message' lines (empty when valid)."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key in CRD_VALIDATORS:
        errors = CRD_VALIDATORS[key].iter_errors(obj)
        return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]
    if key == ("monitoring.coreos.com/v1", "PodMonitor"):
        return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                for e in jsonschema.Draft7Validator(PODMONITOR_SCHEMA).iter_errors(obj)]
    try:
        kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{'/'.join(map(str, error.path))}: {error.message}"]
    return []


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
    return words[2], load_config(config_path, overrides)


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
    return request.param, render_module.render(OVERLAYS[request.param])


def by_kind(objects: list[dict], kind: str) -> dict:
    (obj,) = [o for o in objects if o["kind"] == kind]
    return obj


def test_every_rendered_manifest_is_valid(rendered):
    name, objects = rendered
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == ["ConfigMap", "Deployment", "PersistentVolumeClaim", "PodMonitor", "RayCluster", "RayJob", "Service"]
    for obj in objects:
        assert validation_errors(obj) == [], f"{name}: {obj['kind']} {obj['metadata']['name']}"


def test_ray_clusters_fit_the_runs_they_carry(rendered):
    name, objects = rendered
    job, cluster = by_kind(objects, "RayJob"), by_kind(objects, "RayCluster")
    assert rayjob_problems(job) == []
    _, config = entrypoint_config(job["spec"]["entrypoint"])
    assert cluster_problems(cluster["spec"], config) == []
    # The interactive RayCluster is the RayJob's cluster plus GCS fault tolerance.
    cluster_spec = copy.deepcopy(cluster["spec"])
    fault_tolerance = cluster_spec.pop("gcsFaultToleranceOptions")
    assert cluster_spec == job["spec"]["rayClusterSpec"]
    assert fault_tolerance["redisAddress"] == "dense-rl-redis:6379"
    assert fault_tolerance["redisPassword"] == {"valueFrom": {"secretKeyRef": {"name": "dense-rl-redis", "key": "password"}}}
    if name == "gpu":
        assert config.model.device == "cuda"
        gpu_groups = {g["groupName"] for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
                      if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]}
        assert gpu_groups == {"rollout", "learner"}


def test_no_secret_in_any_manifest_and_metrics_are_wired(rendered):
    _, objects = rendered
    assert "Secret" not in {o["kind"] for o in objects}
    for obj in objects:
        for path, node in walk(obj):
            if isinstance(node, dict) and re.search("password", str(node.get("name", "")) + path.rsplit("/", 1)[-1], re.I):
                assert "value" not in node and "secretKeyRef" in node.get("valueFrom", {}), f"{obj['kind']}{path}"
    # The PodMonitor selects every Ray pod, and each Ray container names the port it scrapes.
    monitor = by_kind(objects, "PodMonitor")["spec"]
    port = monitor["podMetricsEndpoints"][0]["port"]
    for kind in ("RayJob", "RayCluster"):
        spec = by_kind(objects, kind)["spec"]
        spec = spec.get("rayClusterSpec", spec)
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            labels = {**group["template"]["metadata"]["labels"], "ray.io/is-ray-node": "yes"}  # KubeRay adds the latter
            assert monitor["selector"]["matchLabels"].items() <= labels.items()
            assert port in [p["name"] for p in group["template"]["spec"]["containers"][0]["ports"]]
    dashboard = by_kind(objects, "ConfigMap")
    assert dashboard["metadata"]["labels"] == {"grafana_dashboard": "1"}
    (text,) = dashboard["data"].values()
    assert json.loads(text) == json.loads((REPO / "dashboards/dense_rl.json").read_text())
    assert json.loads(text)["uid"] == "dense-rl"


def test_typos_and_impossible_clusters_are_caught():
    objects = render_module.render(OVERLAYS["gpu"])
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


def test_renderer_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\ncommonLabels: {a: b}\n")
    with pytest.raises(render_module.RenderError, match="commonLabels is not supported"):
        render_module.render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        f"resources: [{OVERLAYS['base']}]\npatches:\n  - path: p.yaml\n    target: {{kind: RayJob}}\n")
    (tmp_path / "p.yaml").write_text("- {op: replace, path: /spec/rayClusterSpec/workerGroupSpecs/0/maxReplica, value: 1}\n")
    with pytest.raises(render_module.RenderError, match="'maxReplica' does not exist"):
        render_module.render(tmp_path)


def test_renderer_command_line(capsys):
    assert render_module.main([str(OVERLAYS["cpu-demo"]), "--without", "RayCluster", "--without", "PodMonitor"]) == 0
    printed = list(yaml.safe_load_all(capsys.readouterr().out))
    expected = [o for o in render_module.render(OVERLAYS["cpu-demo"]) if o["kind"] not in ("RayCluster", "PodMonitor")]
    assert printed == expected and len(printed) == 5


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
