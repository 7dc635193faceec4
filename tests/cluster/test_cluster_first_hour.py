"""The first hour with a local cluster (issue 11): a job no registered node can serve fails at
once and says what the cluster serves; a waiting job says why; a running job says what it does
(JobInfo.phase); `kiln uncordon` and `kiln remove-node`. Real binaries on loopback."""
from __future__ import annotations

import json
import os

from cluster_support import pid_alive, requires_cluster, start_cluster, stop_cluster, wait_until

pytestmark = requires_cluster


def _job(cluster, job_id: str) -> dict:
    return json.loads(cluster.kiln("status", job_id, "--json", check=True).stdout)


def test_phases_fail_fast_waiting_reason_and_uncordon(tmp_path):
    cluster = start_cluster(str(tmp_path / "state"), nodes=1)
    try:
        # A cold job: the progress lines say what the node does before the first step.
        generated = cluster.kiln("generate", "--prompt", "a fox", "--steps", "4", "--out",
                                 str(tmp_path / "fox.png"), "--json", timeout=300)
        assert generated.returncode == 0, generated.stderr
        err = generated.stderr
        assert "RUNNING, loading weights transformer on node-1, 0/4 steps" in err, err
        assert "RUNNING, encoding text on node-1, 0/4 steps" in err, err
        assert "RUNNING, denoising on node-1" in err, err
        job = json.loads(generated.stdout)
        assert job["state"] == "SUCCEEDED" and job["phase"] == ""

        # bf16 at 320x320 on an fp32 cluster: refused at once, naming what the cluster serves.
        out = str(tmp_path / "never.png")
        bad = cluster.kiln("generate", "--prompt", "a fox", "--precision", "bf16", "--width",
                           "320", "--height", "320", "--steps", "2", "--out", out,
                           timeout=60)
        assert bad.returncode == 1, bad.stderr
        assert ("FAILED_PRECONDITION: no registered node serves precision bf16 at 320x320 for "
                "model flux-tiny; the cluster serves: flux-tiny fp32 at 256x256") in bad.stderr
        assert not os.path.exists(out)
        # A model nobody has: the error names the field (exit 2).
        nobody = cluster.kiln("submit", "--prompt", "a fox", "--model", "nobody", timeout=60)
        assert nobody.returncode == 2, nobody.stderr
        assert "no registered node serves model nobody" in nobody.stderr
        # fp8 on cpu nodes that declare fp32 only.
        fp8 = cluster.kiln("submit", "--prompt", "a fox", "--precision", "fp8", timeout=60)
        assert fp8.returncode == 1 and "no registered node serves precision fp8" in fp8.stderr

        # A job for a draining node waits, and `kiln wait` shows why.
        cluster.kiln("drain", "node-1", check=True)
        job_id = cluster.kiln("submit", "--prompt", "a hare", "--steps", "4",
                              check=True).stdout.strip()
        waited = cluster.kiln("wait", job_id, "--timeout", "2", timeout=60)
        assert waited.returncode != 0
        assert "QUEUED, waiting: the nodes that can run it are draining (node-1)" in \
            waited.stderr, waited.stderr
        queued = _job(cluster, job_id)
        assert queued["state"] == "QUEUED" and queued["phase"] == "queued"

        # Uncordoned: the node takes jobs again.
        un = cluster.kiln("uncordon", "node-1", "--json", check=True)
        assert json.loads(un.stdout)["state"] == "READY"
        done = cluster.kiln("wait", job_id, "--timeout", "240", "--json", timeout=300)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["state"] == "SUCCEEDED"
    finally:
        stop_cluster(cluster)


def test_remove_node_refuses_running_jobs_unless_forced(tmp_path):
    cluster = start_cluster(str(tmp_path / "state"), nodes=2)
    try:
        # An idle node: removed, stopped, and gone from cluster.json and the node table.
        pid2 = cluster.node("node-2")["pid"]
        removed = cluster.kiln("remove-node", "node-2", "--json", timeout=120)
        assert removed.returncode == 0, removed.stderr
        reply = json.loads(removed.stdout)
        assert reply["local"] is True and reply["stopped_pid"] == pid2
        assert reply["requeued_jobs"] == []
        wait_until(lambda: not pid_alive(pid2), 30, "node-2 to exit")
        assert [n["node_id"] for n in cluster.state()["nodes"]] == ["node-1"]
        nodes = json.loads(cluster.kiln("nodes", "--json", check=True).stdout)["nodes"]
        assert [n["node_id"] for n in nodes] == ["node-1"]

        # A node running a job: refused (nothing changes) unless --force, which requeues it.
        job_id = cluster.kiln("submit", "--prompt", "a long one", "--steps", "1000",
                              check=True).stdout.strip()
        wait_until(lambda: _job(cluster, job_id)["state"] == "RUNNING", 120, "the job to run")
        refused = cluster.kiln("remove-node", "node-1", timeout=60)
        assert refused.returncode == 1
        assert f"node node-1 is running 1 job(s) ({job_id})" in refused.stderr
        pid1 = cluster.node("node-1")["pid"]
        assert pid_alive(pid1)
        forced = cluster.kiln("remove-node", "node-1", "--force", timeout=60)
        assert forced.returncode == 0, forced.stderr
        assert f"node-1 removed (process {pid1} stopped); requeued {job_id}" in forced.stdout
        wait_until(lambda: not pid_alive(pid1), 30, "node-1 to exit")
        # No node is left: the job waits for one rather than failing.
        job = _job(cluster, job_id)
        assert job["state"] == "QUEUED" and job["phase"] == "queued", job
        assert job["error"] == "waiting: requeued after node node-1 was removed (attempt 1 of 3)"

        # Unknown nodes: NOT_FOUND (exit 4).
        assert cluster.kiln("remove-node", "nope", timeout=60).returncode == 4
        assert cluster.kiln("uncordon", "nope", timeout=60).returncode == 4
        cluster.kiln("cancel", job_id, check=True)
    finally:
        stop_cluster(cluster)
