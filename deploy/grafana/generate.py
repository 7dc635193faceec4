#!/usr/bin/env python3
"""Generates kiln's Grafana dashboards (deploy/grafana/dashboards/*.json) from the panel lists
below: the dashboards are source, reviewed here, and the JSON is what Grafana loads (through
provisioning/dashboards/kiln.yml). Run after editing this file:

    python3 deploy/grafana/generate.py          # rewrites dashboards/*.json
    python3 deploy/grafana/generate.py --check  # exit 1 if the committed JSON is stale

make test checks that the committed JSON is what this script writes, and sends every panel's
query to a real Prometheus scraping a local cluster that ran jobs (tests/cluster/
test_cluster_observability.py): a query that returns nothing fails, naming dashboard and panel.
Panels marked gpu=True read NVML telemetry, which only CUDA nodes export.

No dependencies beyond the Python standard library.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "dashboards")
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


@dataclass
class Panel:
    title: str
    queries: list[tuple[str, str]]  # (PromQL, legend)
    unit: str = "short"
    kind: str = "timeseries"        # or "stat"
    gpu: bool = False               # reads GPU telemetry (CUDA nodes only)
    description: str = ""
    width: int = 12


@dataclass
class Dashboard:
    uid: str
    title: str
    description: str
    panels: list[Panel] = field(default_factory=list)


def quantiles(metric: str, by: str, window: str = "5m") -> list[tuple[str, str]]:
    legend = " ".join("{{%s}}" % label for label in by.split(", ")) if by else ""
    group = f"le, {by}" if by else "le"
    return [(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket[{window}])))",
             f"p{int(q * 100)} {legend}".strip()) for q in (0.5, 0.95, 0.99)]


FLEET = Dashboard(
    uid="kiln-fleet", title="kiln / Fleet overview",
    description="Nodes, GPUs and the queue of a kiln cluster.",
    panels=[
        Panel("Nodes by state", [("sum by (state) (kiln_nodes)", "{{state}}")], kind="stat",
              description="Nodes in the coordinator's table: ready, draining, dead, left."),
        Panel("Busy nodes", [("sum(kiln_node_busy)", "busy"),
                             ("count(kiln_node_busy) - sum(kiln_node_busy)", "idle")],
              description="Live nodes running a job vs idle (kiln_node_busy)."),
        Panel("GPU utilization per card", [
            ("max by (node, gpu, uuid) (kiln_gpu_utilization_ratio)", "{{node}} gpu {{gpu}}")],
            unit="percentunit", gpu=True,
            description="Share of time a kernel ran (NVML), per card."),
        Panel("MIG slice SM utilization", [
            ("kiln_mig_sm_utilization_ratio", "{{node}} {{mig_profile}} {{uuid}}")],
            unit="percentunit", gpu=True,
            description="From NVML GPM (Hopper and later); absent without GPM."),
        Panel("GPU memory used per card or slice", [
            ("max by (node, uuid) (kiln_gpu_memory_used_bytes)", "{{node}} {{uuid}}"),
            ("kiln_mig_memory_used_bytes", "{{node}} {{mig_profile}}")], unit="bytes", gpu=True),
        Panel("GPU power", [("max by (node, uuid) (kiln_gpu_power_watts)", "{{node}} {{uuid}}")],
              unit="watt", gpu=True),
        Panel("Queue depth", [("kiln_queue_depth", "queued")],
              description="Jobs waiting at the coordinator for a node."),
        Panel("Queue wait p95 by priority", [
            ("histogram_quantile(0.95, sum by (le, priority) "
             "(rate(kiln_job_queue_wait_seconds_bucket[5m])))", "{{priority}}")], unit="s"),
        Panel("Builds running", [
            ("count by (version, git_commit, torch) (kiln_build_info)",
             "{{version}} {{git_commit}} torch {{torch}}")], kind="stat",
            description="Processes per kiln build (kiln_build_info)."),
    ])

JOBS = Dashboard(
    uid="kiln-jobs", title="kiln / Jobs",
    description="Throughput, latency and failures of kiln jobs.",
    panels=[
        Panel("Images per second", [
            ('sum(rate(kiln_jobs_total{outcome="succeeded"}[5m]))', "images/s")], unit="reqps"),
        Panel("Jobs finished by outcome", [
            ("sum by (outcome) (increase(kiln_jobs_total[1h]))", "{{outcome}}")], kind="stat"),
        Panel("Latency (submit to image) by model and resolution",
              quantiles("kiln_job_latency_seconds", "model, resolution"), unit="s", width=24),
        Panel("Device seconds per image", [
            ("sum by (model, precision, resolution) (rate(kiln_job_run_seconds_sum[5m])) / "
             "sum by (model, precision, resolution) (rate(kiln_job_run_seconds_count[5m]))",
             "{{model}} {{precision}} {{resolution}}")], unit="s",
            description="Assignment to result (cold start included) per succeeded image."),
        Panel("Failures by reason", [
            ("sum by (reason) (increase(kiln_job_failures_total[1h]))", "{{reason}}")],
            kind="stat"),
        Panel("Jobs per node", [
            ("sum by (node, outcome) (increase(kiln_node_jobs_total[1h]))", "{{node}} {{outcome}}")]),
        Panel("Denoising step time p50 per node", [
            ("histogram_quantile(0.5, sum by (le, node) (rate(kiln_node_step_seconds_bucket[5m])))",
             "{{node}}")], unit="s"),
        Panel("Requeued jobs", [("sum(increase(kiln_jobs_requeued_total[1h]))", "requeued")],
              kind="stat"),
    ])

COLD_START = Dashboard(
    uid="kiln-cold-start", title="kiln / Cold start and cache",
    description="How long nodes take to get ready, and where their packages come from.",
    panels=[
        Panel("Cold start p95 by phase (nodes)", [
            ("histogram_quantile(0.95, sum by (le, phase) (rate(kiln_cold_start_seconds_bucket[1h])))",
             "{{phase}}")], unit="s"),
        Panel("Cold start seconds by phase (jobs)", [
            ("sum by (phase) (increase(kiln_job_cold_start_seconds_sum[1h]))", "{{phase}}")],
            unit="s", kind="stat"),
        Panel("Packages by provenance", [
            ("sum by (source) (increase(kiln_job_packages_total[1h]))", "{{source}}")],
            kind="stat", description="resident, local disk, shared cache or compiled, per job."),
        Panel("Cache hit ratio per tier", [
            ('sum by (tier) (increase(kiln_artifact_requests_total{result="hit"}[1h])) / '
             "sum by (tier) (increase(kiln_artifact_requests_total[1h]))", "{{tier}}")],
            unit="percentunit"),
        Panel("Compiles", [("sum by (result) (increase(kiln_artifact_compiles_total[1h]))",
                            "{{result}}")], kind="stat"),
        Panel("Compile time p95", [
            ("histogram_quantile(0.95, sum by (le) (rate(kiln_artifact_compile_seconds_bucket[1h])))",
             "p95")], unit="s"),
        Panel("Shared cache fetches", [
            ("sum(rate(kiln_artifact_fetch_bytes_total[5m]))", "bytes/s")], unit="Bps"),
        Panel("Corrupt packages found", [
            ('sum(increase(kiln_artifact_requests_total{result="corrupt"}[1h]))', "corrupt")],
            kind="stat", description="Quarantined and rebuilt."),
    ])

DASHBOARDS = {"fleet": FLEET, "jobs": JOBS, "cold_start": COLD_START}


def render(d: Dashboard) -> dict:
    panels, x, y = [], 0, 0
    for i, p in enumerate(d.panels, start=1):
        h = 5 if p.kind == "stat" else 8
        if x + p.width > 24:
            x, y = 0, y + 8
        panel = {
            "id": i,
            "type": p.kind,
            "title": p.title,
            "description": p.description + (" (CUDA nodes only.)" if p.gpu else ""),
            "datasource": DATASOURCE,
            "gridPos": {"h": h, "w": p.width, "x": x, "y": y},
            "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}}
            if p.kind == "timeseries" else {"reduceOptions": {"calcs": ["lastNotNull"]}},
            "targets": [{"refId": chr(ord("A") + j), "datasource": DATASOURCE, "expr": expr,
                         "legendFormat": legend} for j, (expr, legend) in enumerate(p.queries)],
        }
        panels.append(panel)
        x += p.width
    return {
        "uid": d.uid,
        "title": d.title,
        "description": d.description,
        "tags": ["kiln"],
        "schemaVersion": 38,
        "version": 1,
        "editable": False,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                                 "label": "Prometheus", "current": {}}]},
        "panels": panels,
    }


def text(d: Dashboard) -> str:
    return json.dumps(render(d), indent=2, sort_keys=True) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="fail if dashboards/*.json are stale")
    args = ap.parse_args()
    stale = []
    os.makedirs(OUT, exist_ok=True)
    for name, d in DASHBOARDS.items():
        path = os.path.join(OUT, f"{name}.json")
        want = text(d)
        have = open(path).read() if os.path.exists(path) else None
        if have != want:
            stale.append(path)
            if not args.check:
                with open(path, "w") as f:
                    f.write(want)
    if args.check and stale:
        print("stale (run deploy/grafana/generate.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
