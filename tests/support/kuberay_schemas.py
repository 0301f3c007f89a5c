"""Strict schemas for what deploy/kuberay renders (test_kuberay.py): KubeRay's v1.7.0 CRDs from
../shared/kuberay-crds with unknown fields rejected, strict subsets of the Prometheus Operator kinds
used, and kubernetes-validate for core kinds."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[2]


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

# The PodMonitor and PrometheusRule fields used here (prometheus-operator's CRDs are not vendored):
# strict subsets.
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


_DURATION = {"type": "string", "pattern": "^([0-9]+(ms|s|m|h|d|w|y))+$"}
_RULE = {"type": "object", "additionalProperties": False, "required": ["expr"],
         "oneOf": [{"required": ["record"]}, {"required": ["alert"]}],
         "properties": {"record": {"type": "string"}, "alert": {"type": "string"}, "expr": {"type": "string"},
                        "for": _DURATION, "keep_firing_for": _DURATION, "labels": _STR_MAP, "annotations": _STR_MAP}}
PROMETHEUSRULE_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PrometheusRule"}, "metadata": OBJECT_META,
        "spec": {"type": "object", "additionalProperties": False, "required": ["groups"], "properties": {
            "groups": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False, "required": ["name", "rules"],
                "properties": {"name": {"type": "string"}, "interval": _DURATION,
                               "rules": {"type": "array", "minItems": 1, "items": _RULE}}}},
        }},
    },
}
OPERATOR_SCHEMAS = {("monitoring.coreos.com/v1", "PodMonitor"): PODMONITOR_SCHEMA,
                    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUSRULE_SCHEMA}


def validation_errors(obj: dict) -> list[str]:
    """Schema errors of one rendered object, as 'path: message' lines (empty when valid)."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key in CRD_VALIDATORS:
        errors = CRD_VALIDATORS[key].iter_errors(obj)
        return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]
    if key in OPERATOR_SCHEMAS:
        return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                for e in jsonschema.Draft7Validator(OPERATOR_SCHEMAS[key]).iter_errors(obj)]
    try:
        kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{'/'.join(map(str, error.path))}: {error.message}"]
    return []
