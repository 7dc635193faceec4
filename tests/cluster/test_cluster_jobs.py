"""Jobs on a warm two-node cluster (the fixture packages are copied into the shared cache, so
nothing compiles): 20 concurrent jobs give the expected images, invalid jobs get field-specific
errors, a repeated job_id returns the same job, the Python client example works end to end, and
a node killed with SIGKILL mid-job loses nothing (that test runs last: it kills a node)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading

import pytest

from cluster_support import (PYTHON, SOURCE, metric, processes_mentioning, requires_cluster,
                             start_cluster, stop_cluster, wait_until)

pytestmark = requires_cluster

PROMPTS = ["a lighthouse on a cliff at dusk", "a cat asleep on a red chair",
           "a bowl of ramen, studio photo", "mountains reflected in a lake"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state_dir = str(tmp_path_factory.mktemp("jobs") / "state")
    c = start_cluster(state_dir, nodes=2)
    yield c
    stop_cluster(c)
    assert processes_mentioning(state_dir) == []


def test_twenty_concurrent_jobs_complete_with_the_expected_images(cluster, tmp_path, references):
    jobs = [(f"conc-{i:02d}", PROMPTS[i % 4], 100 + i % 4) for i in range(20)]
    results: dict = {}

    def run(job_id: str, prompt: str, seed: int) -> None:
        results[job_id] = cluster.kiln(
            "generate", "--prompt", prompt, "--seed", str(seed), "--steps", "1", "--job-id",
            job_id, "--out", str(tmp_path / f"{job_id}.png"), "--json", timeout=600)

    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    nodes = set()
    for job_id, prompt, seed in jobs:
        proc = results[job_id]
        assert proc.returncode == 0, f"{job_id}: {proc.stderr}"
        info = json.loads(proc.stdout)
        assert info["state"] == "SUCCEEDED" and info["job_id"] == job_id
        assert info["image"] == str(tmp_path / f"{job_id}.png")
        nodes.add(info["node_id"])
        got = (tmp_path / f"{job_id}.png").read_bytes()
        assert got == references(prompt, seed, 1), f"{job_id} ({prompt!r}, seed {seed}) differs"
    assert nodes == {"node-1", "node-2"}, "both nodes should have run jobs"
    done = json.loads(cluster.kiln("nodes", "--json", check=True).stdout)["nodes"]
    assert sum(n["jobs_done"] for n in done) >= 20
    # Warm from the shared cache: no node compiled anything.
    for node_id in ("node-1", "node-2"):
        page = cluster.metrics(node_id)
        assert "kiln_artifact_compiles_total" in page
        assert metric(page, "kiln_artifact_compiles_total") == 0, node_id


@pytest.mark.parametrize("flags, field", [
    (["--prompt", ""], "spec.prompt"),
    (["--width", "250"], "spec.width"),
    (["--height", "0"], "spec.height"),
    (["--steps", "0"], "spec.steps"),
    (["--steps", "1001"], "spec.steps"),
    (["--guidance", "101"], "spec.guidance"),
    (["--job-id", "no spaces allowed"], "spec.job_id"),
    (["--job-id", "x" * 129], "spec.job_id"),
    (["--model", "no-such-model"], "spec.model"),
    (["--precision", "fp64"], "spec.precision"),
])
def test_invalid_jobs_get_field_specific_errors(cluster, tmp_path, flags, field):
    args = {"--prompt": "a fox", **dict(zip(flags[::2], flags[1::2]))}
    argv = [a for kv in args.items() for a in kv]
    proc = cluster.kiln("generate", *argv, "--out", str(tmp_path / "x.png"))
    assert proc.returncode == 2, proc.stderr
    assert f"(field {field})" in proc.stderr, proc.stderr
    assert "kiln: error: " in proc.stderr
    assert not (tmp_path / "x.png").exists()


def test_repeated_job_id_returns_the_same_job(cluster, tmp_path):
    args = ("--prompt", PROMPTS[0], "--seed", "5", "--steps", "1", "--job-id", "same-id")
    first = json.loads(cluster.kiln("submit", *args, "--json", check=True).stdout)
    second_proc = cluster.kiln("submit", *args, "--json", check=True)
    second = json.loads(second_proc.stdout)
    assert first["created"] is True and second["created"] is False
    assert first["job_id"] == second["job_id"] == "same-id"
    assert first["submitted_unix_ms"] == second["submitted_unix_ms"]
    # Plain text: the id again, and a note that nothing new was submitted.
    third = cluster.kiln("submit", *args, check=True)
    assert third.stdout == "same-id\n" and "already existed" in third.stderr
    out = tmp_path / "same.png"
    waited = cluster.kiln("wait", "same-id", "--out", str(out), "--timeout", "120", "--json",
                          check=True)
    assert json.loads(waited.stdout)["state"] == "SUCCEEDED"
    # Generating with the same id waits for that job instead of running another one.
    again = cluster.kiln("generate", *args, "--out", str(tmp_path / "again.png"), "--json",
                         check=True)
    assert json.loads(again.stdout)["submitted_unix_ms"] == first["submitted_unix_ms"]
    assert (tmp_path / "again.png").read_bytes() == out.read_bytes()
    status = json.loads(cluster.kiln("status", "same-id", "--json", check=True).stdout)
    assert status["state"] == "SUCCEEDED" and status["attempts"] == 1
    # The same id with a different spec is refused, naming what differs.
    clash = cluster.kiln("submit", "--prompt", "something else", "--seed", "5", "--steps", "1",
                         "--job-id", "same-id")
    assert clash.returncode == 2, clash.stderr
    assert "ALREADY_EXISTS (field spec.job_id)" in clash.stderr
    assert "spec.prompt differs" in clash.stderr


def test_status_and_wait_of_unknown_job(cluster):
    # Exit 4: the coordinator knows no such job (not a mistake in the command line, exit 2).
    proc = cluster.kiln("status", "no-such-job")
    assert proc.returncode == 4 and "NOT_FOUND" in proc.stderr
    proc = cluster.kiln("wait", "no-such-job", "--timeout", "1")
    assert proc.returncode == 4 and "NOT_FOUND" in proc.stderr


def cluster_key_env(cluster) -> dict:
    """The environment with $KILN_KEY / $KILN_SERVER_KEY set to the local cluster's admin key."""
    keys = cluster.state()["keys_dir"]
    return {**os.environ, "KILN_KEY": os.path.join(keys, "admins", "admin.key"),
            "KILN_SERVER_KEY": os.path.join(keys, "coordinator.pub")}


def test_python_client_example_end_to_end(cluster, tmp_path, references):
    out = tmp_path / "py.png"
    proc = subprocess.run(
        [PYTHON, os.path.join(SOURCE, "deploy", "examples", "python_client.py"),
         "--coordinator", cluster.client_endpoint, "--prompt", PROMPTS[1], "--seed", "11",
         "--steps", "1", "--job-id", "python-1", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=str(tmp_path), env=cluster_key_env(cluster))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    assert "python-1: SUCCEEDED" in proc.stderr
    assert out.read_bytes() == references(PROMPTS[1], 11, 1)
    # The same job through the CLI: same image.
    status = json.loads(cluster.kiln("status", "python-1", "--json", check=True).stdout)
    assert status["state"] == "SUCCEEDED"
    # Its errors name the field, like the CLI's.
    bad = subprocess.run(
        [PYTHON, os.path.join(SOURCE, "deploy", "examples", "python_client.py"),
         "--coordinator", cluster.client_endpoint, "--prompt", "x", "--width", "250",
         "--out", str(tmp_path / "bad.png")],
        capture_output=True, text=True, timeout=120, cwd=str(tmp_path), env=cluster_key_env(cluster))
    assert bad.returncode == 2
    assert "INVALID_ARGUMENT (field spec.width)" in bad.stderr
    assert bad.stderr.count("spec.width") == 1, bad.stderr  # the field is said once
    # Its exit codes are the CLI's, also for an error other than INVALID_ARGUMENT.
    for flags in (["--model", "no-such-model"], ["--job-id", "python-1", "--seed", "12"]):
        py = subprocess.run(
            [PYTHON, os.path.join(SOURCE, "deploy", "examples", "python_client.py"),
             "--coordinator", cluster.client_endpoint, "--prompt", "x", "--steps", "1", *flags,
             "--out", str(tmp_path / "other.png")],
            capture_output=True, text=True, timeout=120, cwd=str(tmp_path), env=cluster_key_env(cluster))
        cli = cluster.kiln("generate", "--prompt", "x", "--steps", "1", *flags, "--out",
                           str(tmp_path / "other-cli.png"))
        assert py.returncode == cli.returncode != 0, (flags, py.stderr, cli.stderr)


def test_raw_protocol_from_req_and_dealer_sockets(cluster, kiln_pb2):
    """The .proto is the API: a plain REQ socket works (the delimiter frame is echoed), and a
    message of another protocol version gets an ErrorReply, not silence."""
    import zmq
    pb = kiln_pb2
    ctx = zmq.Context.instance()
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.setsockopt(zmq.RCVTIMEO, 10000)
    cluster.apply_keys(req)
    req.connect(cluster.client_endpoint)
    try:
        env = pb.Envelope(protocol_version=1, request_id="r1", list_nodes=pb.ListNodesRequest())
        req.send(env.SerializeToString())
        reply = pb.Envelope.FromString(req.recv())
        assert reply.request_id == "r1" and reply.WhichOneof("body") == "nodes"
        assert {n.info.node_id for n in reply.nodes.nodes} >= {"node-1", "node-2"}
        env = pb.Envelope(protocol_version=99, request_id="r2", list_nodes=pb.ListNodesRequest())
        req.send(env.SerializeToString())
        reply = pb.Envelope.FromString(req.recv())
        assert reply.WhichOneof("body") == "error" and reply.error.code == "FAILED_PRECONDITION"
    finally:
        req.close()


def test_kill_9_of_a_node_mid_job_loses_nothing(cluster, tmp_path, references):
    """Runs last in this module: it kills a node."""
    prompt, seed, steps = PROMPTS[2], 77, 30
    job_id = "survives-kill"
    cluster.kiln("submit", "--prompt", prompt, "--seed", str(seed), "--steps", str(steps),
                 "--job-id", job_id, check=True)

    def running():
        info = json.loads(cluster.kiln("status", job_id, "--json", check=True).stdout)
        return info if info["state"] == "RUNNING" and info["step"] >= 1 else None

    info = wait_until(running, 120, "the job to start denoising", interval=0.05)
    victim = info["node_id"]
    pid = cluster.node(victim)["pid"]
    os.kill(pid, signal.SIGKILL)
    out = tmp_path / "survivor.png"
    waited = cluster.kiln("wait", job_id, "--out", str(out), "--timeout", "240", "--json")
    assert waited.returncode == 0, waited.stderr
    final = json.loads(waited.stdout)
    assert final["state"] == "SUCCEEDED"
    assert final["node_id"] != victim
    assert final["attempts"] == 2
    assert out.read_bytes() == references(prompt, seed, steps)
    nodes = {n["node_id"]: n["state"]
             for n in json.loads(cluster.kiln("nodes", "--json", check=True).stdout)["nodes"]}
    assert nodes[victim] == "DEAD"
    assert "kiln_jobs_requeued_total" in cluster.metrics()
