"""Render a kustomization in Python: the subset of kustomize these manifests use, with kustomize's
meaning, so `kustomize build --load-restrictor LoadRestrictionsNone DIR` prints the same objects.

    python deploy/kuberay/render.py deploy/kuberay/overlays/gpu --without RayCluster | kubectl apply -f -

Supported kustomization fields (anything else is refused, never silently ignored):
  resources          files (multi-document YAML) and folders holding a kustomization.yaml
  configMapGenerator files (KEY=PATH or PATH), options.labels, options.disableNameSuffixHash: true
  patches            JSON 6902 patches from a file, with target {group, version, kind, name}
  namespace          set on every object
  images             name -> newName / newTag in every `containers` and `initContainers` list
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "configMapGenerator", "patches", "namespace", "images"}


class RenderError(ValueError):
    pass


def render(folder: str | Path) -> list[dict]:
    folder = Path(folder)
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unsupported = sorted(set(kustomization) - SUPPORTED)
    if unsupported:
        raise RenderError(f"{folder}/kustomization.yaml: {unsupported[0]} is not supported by render.py")

    objects: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = folder / entry
        if path.is_dir():
            objects += render(path)
        else:
            objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for generator in kustomization.get("configMapGenerator", []):
        objects.append(config_map(folder, generator))
    for patch in kustomization.get("patches", []):
        operations = yaml.safe_load((folder / patch["path"]).read_text())
        targets = [o for o in objects if matches(o, patch["target"])]
        if not targets:
            raise RenderError(f"{folder}: patch {patch['path']} matches no object ({patch['target']})")
        for target in targets:
            for operation in operations:
                apply_operation(target, operation, f"{folder / patch['path']}")
    if "namespace" in kustomization:
        for o in objects:
            o.setdefault("metadata", {})["namespace"] = kustomization["namespace"]
    for image in kustomization.get("images", []):
        for o in objects:
            set_image(o, image)
    return objects


def config_map(folder: Path, generator: dict) -> dict:
    options = generator.get("options", {})
    if options.get("disableNameSuffixHash") is not True:
        raise RenderError(f"{folder}: configMapGenerator {generator['name']} needs options.disableNameSuffixHash: true")
    data = {}
    for entry in generator.get("files", []):
        key, _, path = entry.rpartition("=") if "=" in entry else ("", "", entry)
        path = folder / path
        data[key or path.name] = path.read_text()
    metadata = {"name": generator["name"]}
    if options.get("labels"):
        metadata["labels"] = dict(options["labels"])
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}


def matches(obj: dict, target: dict) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    return all([
        target.get("kind", obj["kind"]) == obj["kind"],
        target.get("name", obj["metadata"]["name"]) == obj["metadata"]["name"],
        target.get("group", group) == group,
        target.get("version", version) == version,
    ])


def apply_operation(obj: dict, operation: dict, where: str) -> None:
    """One JSON 6902 operation (add, replace, remove) on a JSON pointer path."""
    op, path = operation["op"], operation["path"]
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]
    parent = obj
    for part in parts[:-1]:
        try:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        except (KeyError, IndexError, ValueError):
            raise RenderError(f"{where}: {op} {path}: {part!r} does not exist") from None
    last = parts[-1]
    value = copy.deepcopy(operation.get("value"))
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if op == "add":
            parent.insert(index, value)
        elif op == "replace":
            parent[index] = value
        elif op == "remove":
            del parent[index]
        else:
            raise RenderError(f"{where}: op {op!r} is not supported")
        return
    if op in ("replace", "remove") and last not in parent:
        raise RenderError(f"{where}: {op} {path}: {last!r} does not exist")
    if op in ("add", "replace"):
        parent[last] = value
    elif op == "remove":
        del parent[last]
    else:
        raise RenderError(f"{where}: op {op!r} is not supported")


def set_image(node, image: dict) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    reference = container.get("image", "")
                    name, tag = reference, ""
                    if ":" in reference.rsplit("/", 1)[-1]:  # a tag, not a registry port
                        name, tag = reference.rsplit(":", 1)
                    if name == image["name"]:
                        container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
            set_image(value, image)
    elif isinstance(node, list):
        for item in node:
            set_image(item, image)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Render a kustomization (the subset dense_rl uses) to YAML.")
    parser.add_argument("folder", help="a folder with a kustomization.yaml, e.g. deploy/kuberay/overlays/gpu")
    parser.add_argument("--without", action="append", default=[], metavar="KIND",
                        help="leave out objects of this kind, e.g. RayCluster (repeatable)")
    args = parser.parse_args(argv)
    objects = [o for o in render(args.folder) if o["kind"] not in args.without]
    print(yaml.safe_dump_all(objects, sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
