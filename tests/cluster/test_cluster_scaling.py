"""Scaling a local cluster (issue 11, item 5): the coordinator's kiln_scaling_* signal follows the
load, and nodes sent SIGTERM under load (what a scale-down does) drain: every job completes, and
a job prefetched on a draining node is handed back at once and runs on another node (issue 14)."""
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


def test_sigterm_hands_a_prefetched_job_back_and_it_succeeds_on_another_node(tmp_path,
                                                                             references):
    """A node holds a job it runs and one prefetched behind it (its second job slot). SIGTERM:
    the running job finishes there; the prefetched one goes back to the coordinator at once and
    runs on the other node, finishing before the first one does."""
    state_dir = str(tmp_path / "state")
    cluster = start_cluster(state_dir, nodes=2)
    try:
        def status(job_id):
            return json.loads(cluster.kiln("status", job_id, "--json", check=True).stdout)

        cluster.kiln("drain", "node-2", check=True)  # both jobs go to node-1 first
        # The most steps a job may have: seconds of denoising, outlasting the exchange below.
        cluster.kiln("submit", "--prompt", "a lighthouse", "--seed", "1", "--steps", "1000",
                     "--job-id", "long", check=True)
        wait_until(lambda: status("long")["state"] == "RUNNING" and status("long")["step"] >= 1,
                   120, "the long job to start denoising", interval=0.05)
        prompt, seed, steps = "a cat asleep on a red chair", 5, 2
        cluster.kiln("submit", "--prompt", prompt, "--seed", str(seed), "--steps", str(steps),
                     "--job-id", "prefetched", check=True)
        # node-1's prefetch slot takes it while "long" runs.
        wait_until(lambda: status("prefetched")["node_id"] == "node-1", 60,
                   "the second job to be placed in node-1's prefetch slot", interval=0.05)
        cluster.kiln("uncordon", "node-2", check=True)
        node1_pid = cluster.node("node-1")["pid"]
        os.kill(node1_pid, signal.SIGTERM)

        out = tmp_path / "prefetched.png"
        waited = cluster.kiln("wait", "prefetched", "--out", str(out), "--timeout", "240",
                              "--json", timeout=300)
        assert waited.returncode == 0, waited.stderr
        handed_back = json.loads(waited.stdout)
        assert handed_back["state"] == "SUCCEEDED", handed_back
        assert handed_back["node_id"] == "node-2" and handed_back["attempts"] == 2, handed_back
        assert out.read_bytes() == references(prompt, seed, steps)

        # The long job finishes where it ran, after the one handed back: that one waited for
        # nothing. Then node-1 deregisters and exits.
        waited = cluster.kiln("wait", "long", "--timeout", "300", "--json", timeout=400)
        assert waited.returncode == 0, waited.stderr
        long = json.loads(waited.stdout)
        assert long["state"] == "SUCCEEDED", long
        assert long["node_id"] == "node-1" and long["attempts"] == 1, long
        assert handed_back["finished_unix_ms"] < long["finished_unix_ms"]
        assert metric(cluster.metrics(), "kiln_jobs_requeued_total") == 1  # the prefetched one
        wait_until(lambda: not pid_alive(node1_pid), 120, "node-1 to exit")
        nodes = {n["node_id"]: n["state"]
                 for n in json.loads(cluster.kiln("nodes", "--json", check=True).stdout)["nodes"]}
        assert nodes["node-1"] == "LEFT" and nodes["node-2"] == "READY", nodes
    finally:
        stop_cluster(cluster)
    assert processes_mentioning(state_dir) == []
