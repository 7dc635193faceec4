"""deploy/k8s: every overlay renders, every object validates — the Kubernetes ones against the
Kubernetes OpenAPI schemas of a pinned version (kubernetes-validate, strict: unknown fields are
errors), the KEDA and Prometheus-operator ones against a schema of the fields kiln uses, written
here from those projects' reference documentation — and the objects agree with each other and
with kiln's executables (selectors match pods, probes and monitors name real ports, every flag
given to kiln-coordinator and kiln-node exists or is a flag named as being added, and the built
executables run with those flags)."""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from kustomize_render import Obj, render

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))
RENDERED = [K8S / "base"] + OVERLAYS


def kubernetes_version() -> str:
    """The Kubernetes version the manifests are validated against: pinned in requirements.txt
    beside kubernetes-validate, as `# kubernetes-validate: Kubernetes X.Y.Z`."""
    m = re.search(r"kubernetes-validate: Kubernetes (\d+\.\d+\.\d+)",
                  (ROOT / "requirements.txt").read_text())
    assert m, "requirements.txt must pin the Kubernetes version next to kubernetes-validate"
    return m.group(1)


# Flags kiln's manifests pass that are being added by other work (issue 9: cluster mode on
# Redis). A flag here must also be named in a comment of the manifest that uses it.
PENDING_FLAGS = {"kiln-coordinator": {"redis"}, "kiln-node": set()}

# ---- schemas of the custom resources kiln uses, from their reference documentation ----------
# KEDA 2.17, https://keda.sh/docs/2.17/reference/scaledobject-spec/ and
# https://keda.sh/docs/2.17/scalers/prometheus/ (trigger metadata is a map of strings).
_OBJECT_META = {"type": "object", "required": ["name"],
                "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                               "labels": {"type": "object",
                                          "additionalProperties": {"type": "string"}},
                               "annotations": {"type": "object",
                                               "additionalProperties": {"type": "string"}}},
                "additionalProperties": False}
_PROMETHEUS_TRIGGER_METADATA = {
    "type": "object", "required": ["serverAddress", "query", "threshold"],
    "properties": {k: {"type": "string"} for k in (
        "serverAddress", "query", "threshold", "activationThreshold", "namespace",
        "customHeaders", "ignoreNullValues", "queryParameters", "unsafeSsl", "authModes")},
    "additionalProperties": False}
SCALED_OBJECT = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"}, "kind": {"const": "ScaledObject"},
        "metadata": _OBJECT_META,
        "spec": {
            "type": "object", "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object", "required": ["name"], "additionalProperties": False,
                    "properties": {k: {"type": "string"} for k in (
                        "apiVersion", "kind", "name", "envSourceContainerName")}},
                **{k: {"type": "integer", "minimum": 0} for k in (
                    "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
                    "idleReplicaCount", "minReplicaCount", "maxReplicaCount")},
                "fallback": {
                    "type": "object", "required": ["failureThreshold", "replicas"],
                    "additionalProperties": False,
                    "properties": {
                        "failureThreshold": {"type": "integer", "minimum": 1},
                        "replicas": {"type": "integer", "minimum": 0},
                        "behavior": {"enum": ["static", "currentReplicas",
                                              "currentReplicasIfHigher",
                                              "currentReplicasIfLower"]}}},
                "advanced": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        # behavior: an autoscaling/v2 HPA's, validated as one below.
                        "horizontalPodAutoscalerConfig": {
                            "type": "object", "additionalProperties": False,
                            "properties": {"name": {"type": "string"},
                                           "behavior": {"type": "object"}}},
                        "scalingModifiers": {
                            "type": "object", "additionalProperties": False,
                            "properties": {k: {"type": "string"} for k in (
                                "formula", "target", "activationTarget", "metricType")}}}},
                "triggers": {
                    "type": "array", "minItems": 1,
                    "items": {
                        "type": "object", "required": ["type", "metadata"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"type": "string"}, "name": {"type": "string"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            "authenticationRef": {
                                "type": "object", "required": ["name"],
                                "properties": {"name": {"type": "string"},
                                               "kind": {"type": "string"}}},
                            "metadata": {"type": "object",
                                         "additionalProperties": {"type": "string"}}},
                        "if": {"properties": {"type": {"const": "prometheus"}}},
                        "then": {"properties": {"metadata": _PROMETHEUS_TRIGGER_METADATA}}}}}}},
    "additionalProperties": False}

# prometheus-operator monitoring.coreos.com/v1, API reference (PodMonitorSpec,
# PodMetricsEndpoint, RelabelConfig, NamespaceSelector; PrometheusRuleSpec, RuleGroup, Rule).
_DURATION = {"type": "string",
             "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
                        r"(([0-9]+)s)?(([0-9]+)ms)?)$"}
_LABEL_SELECTOR = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {"type": "array", "items": {
            "type": "object", "required": ["key", "operator"], "additionalProperties": False,
            "properties": {"key": {"type": "string"},
                           "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                           "values": {"type": "array", "items": {"type": "string"}}}}}}}
_RELABEL = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "sourceLabels": {"type": "array",
                         "items": {"type": "string", "pattern": r"^[a-zA-Z_][a-zA-Z0-9_]*$"}},
        "separator": {"type": "string"}, "targetLabel": {"type": "string"},
        "regex": {"type": "string"}, "modulus": {"type": "integer"},
        "replacement": {"type": "string"},
        "action": {"enum": [a for b in ("replace", "keep", "drop", "hashmod", "labelmap",
                                        "labeldrop", "labelkeep", "lowercase", "uppercase",
                                        "keepequal", "dropequal")
                            for a in (b, b.capitalize())]}}}
POD_MONITOR = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PodMonitor"},
        "metadata": _OBJECT_META,
        "spec": {
            "type": "object", "required": ["selector", "podMetricsEndpoints"],
            "additionalProperties": False,
            "properties": {
                "jobLabel": {"type": "string"},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "selector": _LABEL_SELECTOR,
                "namespaceSelector": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"any": {"type": "boolean"},
                                   "matchNames": {"type": "array",
                                                  "items": {"type": "string"}}}},
                "sampleLimit": {"type": "integer"}, "targetLimit": {"type": "integer"},
                "podMetricsEndpoints": {
                    "type": "array", "minItems": 1,
                    "items": {
                        "type": "object", "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"}, "portNumber": {"type": "integer"},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                            "interval": _DURATION, "scrapeTimeout": _DURATION,
                            "honorLabels": {"type": "boolean"},
                            "honorTimestamps": {"type": "boolean"},
                            "params": {"type": "object"},
                            "relabelings": {"type": "array", "items": _RELABEL},
                            "metricRelabelings": {"type": "array", "items": _RELABEL}}}}}}}}
PROMETHEUS_RULE = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"}, "metadata": _OBJECT_META,
        "spec": {
            "type": "object", "additionalProperties": False,
            "properties": {"groups": {"type": "array", "items": {
                "type": "object", "required": ["name", "rules"], "additionalProperties": False,
                "properties": {
                    "name": {"type": "string"}, "interval": _DURATION,
                    "limit": {"type": "integer"}, "query_offset": _DURATION,
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                    "rules": {"type": "array", "minItems": 1, "items": {
                        "type": "object", "required": ["expr"], "additionalProperties": False,
                        "oneOf": [{"required": ["record"]}, {"required": ["alert"]}],
                        "properties": {
                            "record": {"type": "string"}, "alert": {"type": "string"},
                            "expr": {"type": "string"}, "for": _DURATION,
                            "keep_firing_for": _DURATION,
                            "labels": {"type": "object",
                                       "additionalProperties": {"type": "string"}},
                            "annotations": {"type": "object",
                                            "additionalProperties": {"type": "string"}}}}}}}}}}}}
CUSTOM_SCHEMAS = {("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT,
                  ("monitoring.coreos.com/v1", "PodMonitor"): POD_MONITOR,
                  ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE}


def validate(obj: Obj) -> None:
    """Raises if OBJ is not valid: Kubernetes kinds by kubernetes-validate (strict), the custom
    resources by the schemas above."""
    schema = CUSTOM_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
    if schema is None:
        kubernetes_validate.validate(obj, kubernetes_version(), strict=True)
        return
    jsonschema.validate(obj, schema)
    if obj["kind"] == "ScaledObject":
        # KEDA hands advanced.horizontalPodAutoscalerConfig.behavior to the HPA it makes.
        behavior = (obj["spec"].get("advanced", {}).get("horizontalPodAutoscalerConfig", {})
                    .get("behavior"))
        if behavior is not None:
            hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
                   "metadata": {"name": "behavior-check"},
                   "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "x"},
                            "maxReplicas": 1, "behavior": behavior}}
            kubernetes_validate.validate(hpa, kubernetes_version(), strict=True)


def by_kind(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[Obj], kind: str, name: str) -> Obj:
    hits = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(hits) == 1, f"want one {kind}/{name}, found {len(hits)}"
    return hits[0]


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    for k, v in selector.get("matchLabels", {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions", []):
        present, value = e["key"] in labels, labels.get(e["key"])
        op = e["operator"]
        if (op == "In" and value not in e["values"]) or \
           (op == "NotIn" and value in e["values"]) or \
           (op == "Exists" and not present) or (op == "DoesNotExist" and present):
            return False
    return True


def workloads(objs: list[Obj]) -> list[Obj]:
    return [o for o in objs if o["kind"] in ("Deployment", "StatefulSet")]


def container_ports(workload: Obj) -> dict[str, int]:
    return {p["name"]: p["containerPort"]
            for c in workload["spec"]["template"]["spec"]["containers"]
            for p in c.get("ports", []) if "name" in p}


def flags_of(executable: str) -> set[str]:
    source = {"kiln-coordinator": "kiln_coordinator.cc", "kiln-node": "kiln_node.cc"}[executable]
    text = (ROOT / "apps" / source).read_text()
    return set(re.findall(r"ABSL_FLAG\(\s*[^,]+,\s*(\w+)\s*,", text, re.S))


@pytest.fixture(scope="module", params=RENDERED, ids=lambda p: str(p.relative_to(K8S)))
def rendered(request) -> list[Obj]:
    return render(request.param)


def test_there_is_a_gpu_and_a_mig_overlay() -> None:
    assert {p.name for p in OVERLAYS} >= {"gpu", "mig", "gpu-hpa"}


def test_every_object_validates(rendered: list[Obj]) -> None:
    assert rendered
    for obj in rendered:
        try:
            validate(obj)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as e:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {e}")


def test_every_namespaced_object_is_in_the_kiln_namespace(rendered: list[Obj]) -> None:
    for obj in rendered:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "kiln", obj["metadata"]["name"]


def test_services_pdbs_and_monitors_select_pods_and_name_their_ports(rendered) -> None:
    pods = [(w, w["spec"]["template"]["metadata"]["labels"]) for w in workloads(rendered)]
    for svc in by_kind(rendered, "Service"):
        hits = [w for w, labels in pods if selects({"matchLabels": svc["spec"]["selector"]},
                                                   labels)]
        assert hits, f"Service {svc['metadata']['name']} selects no pod"
        for port in svc["spec"]["ports"]:
            for w in hits:
                assert port["targetPort"] in container_ports(w), (svc["metadata"]["name"], port)
    for pdb in by_kind(rendered, "PodDisruptionBudget"):
        assert any(selects(pdb["spec"]["selector"], labels) for _, labels in pods), \
            f"PodDisruptionBudget {pdb['metadata']['name']} selects no pod"
    for monitor in by_kind(rendered, "PodMonitor"):
        hits = [w for w, labels in pods if selects(monitor["spec"]["selector"], labels)]
        names = {w["metadata"]["name"] for w in hits}
        assert names == {"kiln-coordinator", "kiln-node"}, names
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            for w in hits:
                assert endpoint["port"] in container_ports(w), (w["metadata"]["name"], endpoint)
    for policy in by_kind(rendered, "NetworkPolicy"):
        assert any(selects(policy["spec"]["podSelector"], labels) for _, labels in pods)
        for rule in policy["spec"]["ingress"]:
            sources = {w["metadata"]["name"] for w, labels in pods
                       if any(selects(f["podSelector"], labels) for f in rule["from"])}
            assert sources == {"kiln-coordinator", "kiln-node"}, sources
    for w in workloads(rendered):
        assert selects(w["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])


def test_autoscalers_target_the_node_deployment(rendered: list[Obj]) -> None:
    scalers = by_kind(rendered, "ScaledObject") + by_kind(rendered, "HorizontalPodAutoscaler")
    assert len(scalers) <= 1, "KEDA and a plain HPA must not both scale the nodes"
    for s in scalers:
        ref = s["spec"]["scaleTargetRef"]
        assert ref.get("kind", "Deployment") == "Deployment" and ref["name"] == "kiln-node"
        one(rendered, "Deployment", ref["name"])
    for s in by_kind(rendered, "ScaledObject"):
        (trigger,) = s["spec"]["triggers"]
        assert trigger["type"] == "prometheus"
        assert "kiln_scaling_queued_jobs" in trigger["metadata"]["query"]
        assert "kiln_scaling_nodes" in trigger["metadata"]["query"]
        assert 1 <= s["spec"]["minReplicaCount"] < s["spec"]["maxReplicaCount"]


def test_redis_keeps_an_append_only_file_on_a_volume(rendered: list[Obj]) -> None:
    redis = one(rendered, "StatefulSet", "kiln-redis")
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--appendfsync") + 1] == "always"
    data = args[args.index("--dir") + 1]
    claims = {c["metadata"]["name"] for c in redis["spec"]["volumeClaimTemplates"]}
    assert any(m["mountPath"] == data and m["name"] in claims for m in container["volumeMounts"])


def test_two_coordinators_share_one_redis(rendered: list[Obj]) -> None:
    coordinator = one(rendered, "Deployment", "kiln-coordinator")
    assert coordinator["spec"]["replicas"] == 2
    (container,) = coordinator["spec"]["template"]["spec"]["containers"]
    assert "--redis=redis://kiln-redis:6379/0" in container["args"]


def test_nodes_take_one_gpu_or_mig_slice_and_stop_gracefully(rendered: list[Obj]) -> None:
    node = one(rendered, "Deployment", "kiln-node")
    pod = node["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    devices = [r for r in limits if r == "nvidia.com/gpu" or r.startswith("nvidia.com/mig-")]
    assert len(devices) == 1, devices
    assert limits[devices[0]] == requests[devices[0]] == "1"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in container_ports(node)
    drain = " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    assert "kiln drain" in drain and "$POD_NAME" in drain
    assert any(a == "--node_id=$(POD_NAME)" for a in container["args"])
    # The longest job: a cold start compiling every flux-dev package (362 s measured on an H100,
    # bench/README.md) plus the job itself.
    assert pod["terminationGracePeriodSeconds"] >= 420
    models = next(m for m in container["volumeMounts"] if m["mountPath"] == "/models")
    assert models["readOnly"]
    volume = next(v for v in pod["volumes"] if v["name"] == models["name"])
    assert "persistentVolumeClaim" in volume
    one(rendered, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    model_flags = [a for a in container["args"] if a.startswith("--model=")]
    assert model_flags and all(a.split("=", 2)[2].startswith("/models/") for a in model_flags)


def test_the_mig_overlay_asks_for_a_mig_slice_not_a_gpu() -> None:
    node = one(render(K8S / "overlays" / "mig"), "Deployment", "kiln-node")
    limits = node["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in limits
    assert any(r.startswith("nvidia.com/mig-") for r in limits)


def test_flags_given_to_kiln_exist_or_are_being_added(rendered: list[Obj]) -> None:
    images = {"kiln-coordinator": "kiln-coordinator", "kiln-node": "kiln-node"}
    checked = set()
    for w in workloads(rendered):
        for c in w["spec"]["template"]["spec"]["containers"]:
            exe = next((e for e in images if f"/{e}:" in c["image"] or c["image"] == e), None)
            if exe is None:
                continue
            checked.add(exe)
            known = flags_of(exe) | PENDING_FLAGS[exe]
            for arg in c.get("args", []):
                assert arg.startswith("--"), f"{exe}: use --flag=value form, not {arg!r}"
                name = arg[2:].split("=", 1)[0]
                assert name in known, f"{exe} has no flag --{name} (apps/*.cc)"
    assert checked == set(images)


def test_pending_flags_are_named_in_a_manifest_comment() -> None:
    text = "\n".join(p.read_text() for p in K8S.rglob("*.yaml"))
    for exe, flags in PENDING_FLAGS.items():
        for flag in flags:
            assert re.search(rf"#.*--{flag}\b", text), f"--{flag} ({exe}): say it is being added"


def test_a_broken_object_fails_validation() -> None:
    """The checks can fail: an unknown field, a wrong type and a missing required field are
    caught in a Kubernetes object and in each custom resource."""
    objs = render(K8S / "overlays" / "gpu")
    node = copy.deepcopy(one(objs, "Deployment", "kiln-node"))
    node["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}  # typo
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(node)
    node = copy.deepcopy(one(objs, "Deployment", "kiln-node"))
    node["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(node)
    scaled = copy.deepcopy(one(objs, "ScaledObject", "kiln-node"))
    scaled["spec"]["minReplicas"] = 1  # the HPA's name, not KEDA's
    with pytest.raises(jsonschema.ValidationError):
        validate(scaled)
    scaled = copy.deepcopy(one(objs, "ScaledObject", "kiln-node"))
    del scaled["spec"]["triggers"][0]["metadata"]["threshold"]
    with pytest.raises(jsonschema.ValidationError):
        validate(scaled)
    scaled = copy.deepcopy(one(objs, "ScaledObject", "kiln-node"))
    scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"][
        "stabilizationWindow"] = 300
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(scaled)
    monitor = copy.deepcopy(one(objs, "PodMonitor", "kiln"))
    monitor["spec"]["podMetricsEndpoints"][0]["interval"] = "15 seconds"
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor)
    rule = copy.deepcopy(one(render(K8S / "overlays" / "gpu-hpa"), "PrometheusRule",
                             "kiln-autoscaling"))
    rule["spec"]["groups"][0]["rules"][0]["alert"] = "both"
    with pytest.raises(jsonschema.ValidationError):
        validate(rule)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian: prometheus) "
                    "is not installed")
def test_autoscaling_queries_parse(tmp_path: Path) -> None:
    """The KEDA trigger's query and the recording rule are valid PromQL (promtool check rules)."""
    groups = []
    for overlay in ("gpu", "gpu-hpa"):
        objs = render(K8S / "overlays" / overlay)
        for rule in by_kind(objs, "PrometheusRule"):
            groups += rule["spec"]["groups"]
        for s in by_kind(objs, "ScaledObject"):
            groups.append({"name": "keda-" + s["metadata"]["name"], "rules": [
                {"record": "kiln_keda_query", "expr": t["metadata"]["query"]}
                for t in s["spec"]["triggers"]]})
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    r = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed (the "
                    "Python render is then the only one)")
@pytest.mark.parametrize("directory", RENDERED, ids=lambda p: str(p.relative_to(K8S)))
def test_the_python_render_equals_kubectl_kustomize(directory: Path) -> None:
    r = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True)
    if r.returncode != 0 and "unknown command" in r.stderr:
        pytest.skip("this kubectl has no kustomize")
    assert r.returncode == 0, r.stderr
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    theirs = sorted((d for d in yaml.safe_load_all(r.stdout) if d), key=key)
    assert sorted(render(directory), key=key) == theirs


def manifest_args(executable: str) -> list[str]:
    """The args the gpu overlay gives EXECUTABLE as the kubelet passes them ($(VAR) expanded
    from the container's env; a pod name for metadata.name), less the flags still being added,
    with fixed ports on every interface moved to free loopback ports (tests use ephemeral
    ports)."""
    (container,) = one(render(K8S / "overlays" / "gpu"), "Deployment",
                       executable)["spec"]["template"]["spec"]["containers"]
    env = {}
    for e in container.get("env", []):
        field = e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        env[e["name"]] = e["value"] if "value" in e else \
            {"metadata.name": f"{executable}-5d8c7b9f6-x2x7q"}[field]
    out = []
    for arg in container["args"]:
        arg = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg)
        name, _, value = arg[2:].partition("=")
        if name in PENDING_FLAGS[executable]:
            continue
        value = re.sub(r"0\.0\.0\.0:\d+", "127.0.0.1:0", value)
        out.append(f"--{name}={value}")
    return out


def kiln_bin(executable: str) -> Path:
    path = Path(os.environ.get("KILN_BIN", ROOT / "build" / "bin")) / executable
    if not path.exists():
        pytest.skip(f"{path} is not built")
    return path


def with_local_keys(args: list[str], tmp_path: Path) -> list[str]:
    """The manifest's /etc/kiln/... key paths (mounted Secrets) moved under tmp_path, with key
    pairs made there by `kiln keys new` as the Secrets would hold them: NAME.key for a --key
    flag, NAME.pub for a --coordinator_key, an allowlist directory with one .pub per list."""
    out = []
    for arg in args:
        name, _, value = arg[2:].partition("=")
        if value.startswith("/etc/kiln/"):
            value = str(tmp_path / "etc-kiln" / value[len("/etc/kiln/"):])
            path = Path(value)
            if value.endswith((".key", ".pub")):
                path.parent.mkdir(parents=True, exist_ok=True)
                stem = path.name.rsplit(".", 1)[0]
                if not (path.parent / f"{stem}.key").exists():
                    subprocess.run([str(kiln_bin("kiln")), "keys", "new", stem, "--dir",
                                    str(path.parent)], check=True, capture_output=True)
            else:  # an allowlist directory
                path.mkdir(parents=True, exist_ok=True)
                subprocess.run([str(kiln_bin("kiln")), "keys", "new", "someone", "--dir",
                                str(path)], check=True, capture_output=True)
        out.append(f"--{name}={value}")
    return out


def test_the_coordinator_runs_with_the_manifest_flags(tmp_path: Path) -> None:
    """kiln-coordinator starts and serves with the flags of its manifest (the Redis flag aside)
    and stops cleanly on SIGTERM, as Kubernetes stops it."""
    endpoints = tmp_path / "endpoints.json"
    args = with_local_keys(manifest_args("kiln-coordinator"), tmp_path) + [
        f"--endpoints_file={endpoints}"]
    proc = subprocess.Popen([str(kiln_bin("kiln-coordinator")), *args],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not endpoints.exists():
            assert proc.poll() is None, f"exited {proc.returncode}: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "no endpoints file after 30 s"
            time.sleep(0.05)
        metrics_url = json.loads(endpoints.read_text())["metrics_url"]
        with urllib.request.urlopen(metrics_url, timeout=10) as r:
            assert b"kiln_queue_depth" in r.read()  # what the autoscalers query
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
    assert rc == 0, proc.stderr.read()


def test_the_node_accepts_the_manifest_flags(tmp_path: Path) -> None:
    """kiln-node parses and validates every flag of its manifest (the ones being added aside);
    without a GPU it then stops at the device, with a message that is not about a flag."""
    args = with_local_keys([re.sub(r"=/var/lib/kiln/packages$", f"={tmp_path}/packages", a)
                            for a in manifest_args("kiln-node")], tmp_path)
    proc = subprocess.Popen([str(kiln_bin("kiln-node")), *args], stderr=subprocess.PIPE,
                            text=True)
    try:
        _, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:  # a GPU here: it is running, so the flags were taken
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        return
    for bad in ("Unknown command line flag", "Illegal value", "error: --"):
        assert bad not in err, err
    assert proc.returncode == 2 and "device" in err, err
