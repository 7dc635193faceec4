"""Renders kiln's kustomize layout (deploy/k8s) in Python, so that the manifests can be checked on
a machine without kubectl: resources (files and directories), components, namespace, labels,
images and JSON 6902 patches — the features deploy/k8s uses. Any other kustomization field is an
error, so a manifest change that needs more is noticed here rather than silently ignored.
Used by test_k8s_manifests.py, which also compares this render with `kubectl kustomize` where
kubectl exists."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

# Kinds kustomize's namespace transformer leaves alone (cluster-scoped) among those kiln uses.
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PersistentVolume", "StorageClass"}
KNOWN_FIELDS = {"apiVersion", "kind", "namespace", "labels", "resources", "components", "images",
                "patches"}


class RenderError(Exception):
    pass


def load_docs(path: Path) -> list[Obj]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _kustomization(directory: Path) -> Obj:
    path = directory / "kustomization.yaml"
    if not path.is_file():
        raise RenderError(f"{directory}: no kustomization.yaml")
    k = yaml.safe_load(path.read_text())
    unknown = set(k) - KNOWN_FIELDS
    if unknown:
        raise RenderError(f"{path}: fields this renderer does not implement: {sorted(unknown)}")
    return k


def _pointer_parts(path: str) -> list[str]:
    if not path.startswith("/"):
        raise RenderError(f"JSON pointer {path!r} must start with /")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def apply_json_patch(obj: Obj, ops: list[Obj]) -> None:
    """RFC 6902 add/remove/replace on dicts and lists (what deploy/k8s's patches use)."""
    for op in ops:
        parts = _pointer_parts(op["path"])
        parent: Any = obj
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent[p]
        last = parts[-1]
        kind = op["op"]
        if isinstance(parent, list):
            index = len(parent) if last == "-" else int(last)
            if kind == "add":
                parent.insert(index, copy.deepcopy(op["value"]))
            elif kind == "remove":
                del parent[index]
            elif kind == "replace":
                parent[index] = copy.deepcopy(op["value"])
            else:
                raise RenderError(f"patch op {kind!r} not implemented")
        else:
            if kind in ("remove", "replace") and last not in parent:
                raise RenderError(f"patch {kind} {op['path']}: no such member")
            if kind == "remove":
                del parent[last]
            elif kind in ("add", "replace"):
                parent[last] = copy.deepcopy(op["value"])
            else:
                raise RenderError(f"patch op {kind!r} not implemented")


def _matches(target: Obj, obj: Obj) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    checks = {"group": group, "version": version, "kind": obj["kind"],
              "name": obj["metadata"]["name"]}
    return all(target[k] == v for k, v in checks.items() if k in target)


def _apply(k: Obj, objs: list[Obj], where: Path) -> None:
    for patch in k.get("patches", []):
        if "path" in patch:
            raise RenderError(f"{where}: patch files are not implemented; inline the patch")
        ops = yaml.safe_load(patch["patch"])
        hits = [o for o in objs if _matches(patch["target"], o)]
        if not hits:
            raise RenderError(f"{where}: patch target {patch['target']} matches nothing")
        for o in hits:
            apply_json_patch(o, ops)
    if "namespace" in k:
        for o in objs:
            if o["kind"] == "Namespace":
                continue
            if o["kind"] not in CLUSTER_SCOPED:
                o["metadata"]["namespace"] = k["namespace"]
    for entry in k.get("labels", []):
        if entry.get("includeSelectors") or entry.get("includeTemplates"):
            raise RenderError(f"{where}: labels with selectors/templates not implemented")
        for o in objs:
            o["metadata"].setdefault("labels", {}).update(entry["pairs"])
    for image in k.get("images", []):
        for o in objs:
            for c in _containers(o):
                if c["image"].split(":")[0] == image["name"]:
                    name = image.get("newName", image["name"])
                    tag = image.get("newTag", c["image"].partition(":")[2] or "latest")
                    c["image"] = f"{name}:{tag}"


def _containers(o: Obj) -> list[Obj]:
    spec = o.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("containers", []) + spec.get("initContainers", [])


def render(directory: Path) -> list[Obj]:
    """The objects `kubectl kustomize DIRECTORY` would print (up to ordering)."""
    directory = directory.resolve()
    k = _kustomization(directory)
    if k.get("kind", "Kustomization") != "Kustomization":
        raise RenderError(f"{directory}: is a {k['kind']}, render a Kustomization")
    objs: list[Obj] = []
    for r in k.get("resources", []):
        path = directory / r
        objs += render(path) if path.is_dir() else load_docs(path)
    for c in k.get("components", []):
        cdir = (directory / c).resolve()
        ck = _kustomization(cdir)
        if ck.get("kind") != "Component":
            raise RenderError(f"{cdir}: listed as a component but is a {ck.get('kind')}")
        for r in ck.get("resources", []):
            objs += load_docs(cdir / r)
        _apply(ck, objs, cdir)
    _apply({f: v for f, v in k.items() if f != "patches"} | {"patches": k.get("patches", [])},
           objs, directory)
    return objs
