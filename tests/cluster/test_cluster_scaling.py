"""Scaling a local cluster (issue 11, item 5): the coordinator's kiln_scaling_* signal follows the
load, and nodes sent SIGTERM under load (what a scale-down does) drain: every job completes."""
from __future__ import annotations

import json
import os
import signal

from cluster_support import (metric, pid_alive, processes_mentioning, requires_cluster,
                             start_cluster, stop_cluster, wait_until)

pytestmark = requires_cluster

MODEL = {"model": "flux-tiny", "precision": "default"}


def test_sigterm_to_nodes_under_load_loses_no_job(tmp_path):
    state_dir = str(tmp_path / "state")
    cluster = start_cluster(state_dir, nodes=3)
    try:
        # Idle: three ready nodes, nothing queued.
        def idle_signal():
            page = cluster.metrics()
            return page if metric(page, "kiln_scaling_nodes", state="ready", **MODEL) == 3 \
                else None
        page = wait_until(idle_signal, 30, "the scaling signal to show three ready nodes")
        assert metric(page, "kiln_scaling_queued_jobs", **MODEL) == 0
        assert metric(page, "kiln_scaling_nodes", state="busy", **MODEL) == 0

        jobs = [f"load-{i:02d}" for i in range(12)]
        for i, job_id in enumerate(jobs):
            cluster.kiln("submit", "--prompt", "a lighthouse", "--seed", str(i), "--steps", "8",
                         "--job-id", job_id, check=True)

        # Under load: jobs queued, every node busy, and a wait estimated once one job is done.
        def loaded_signal():
            page = cluster.metrics()
            queued = metric(page, "kiln_scaling_queued_jobs", **MODEL)
            busy = metric(page, "kiln_scaling_nodes", state="busy", **MODEL)
            return page if queued >= 1 and busy == 3 else None
        page = wait_until(loaded_signal, 60, "the scaling signal to show the queue")
        assert metric(page, "kiln_scaling_queued_jobs", **MODEL) <= len(jobs) - 3

        # Scale down: SIGTERM two nodes while they run jobs.
        victims = ["node-1", "node-2"]
        pids = [cluster.node(n)["pid"] for n in victims]
        for pid in pids:
            os.kill(pid, signal.SIGTERM)

        for job_id in jobs:
            waited = cluster.kiln("wait", job_id, "--timeout", "300", "--json", timeout=400)
            assert waited.returncode == 0, f"{job_id}: {waited.stderr}"
            assert json.loads(waited.stdout)["state"] == "SUCCEEDED", waited.stdout
        # kiln status --json reports the image's real size (it said 0 before).
        status = json.loads(cluster.kiln("status", jobs[0], "--json", check=True).stdout)
        assert status["png_bytes"] > 100, status
        wait_until(lambda: not any(pid_alive(p) for p in pids), 60, "the drained nodes to exit")
        nodes = {n["node_id"]: n["state"]
                 for n in json.loads(cluster.kiln("nodes", "--json", check=True).stdout)["nodes"]}
        assert all(nodes[v] != "READY" for v in victims), nodes
        assert nodes["node-3"] == "READY"

        # Drained: one ready node left, nothing queued.
        def drained_signal():
            page = cluster.metrics()
            ready = metric(page, "kiln_scaling_nodes", state="ready", **MODEL)
            busy = metric(page, "kiln_scaling_nodes", state="busy", **MODEL)
            return page if ready == 1 and busy == 0 else None
        page = wait_until(drained_signal, 30, "the scaling signal to show one idle node")
        assert metric(page, "kiln_scaling_queued_jobs", **MODEL) == 0
        assert metric(page, "kiln_scaling_wait_seconds", **MODEL) == 0
    finally:
        stop_cluster(cluster)
    assert processes_mentioning(state_dir) == []
