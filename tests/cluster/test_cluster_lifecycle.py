"""`kiln up` / `add-node` / `down`: cluster.json, live processes, metrics endpoints, foreground
mode with Ctrl-C, and refusing to start a second cluster over a running one. No job runs here."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request

from cluster_support import (BIN, MODEL, Cluster, kiln, pid_alive, processes_mentioning,
                             requires_cluster,
                             start_cluster, stop_cluster, wait_until)

pytestmark = requires_cluster


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def test_up_add_node_down(tmp_path):
    state_dir = str(tmp_path / "state")
    cluster = start_cluster(state_dir, nodes=2, seed_cache=False)
    try:
        assert "cluster up in" in cluster.up_output
        state = cluster.state()
        assert state["state"] == "up" and state["version"] == 1
        assert state["client_endpoint"] == state["coordinator"]["client_endpoint"]
        assert state["client_endpoint"].startswith("tcp://127.0.0.1:")
        assert state["shared_cache"] == os.path.join(state_dir, "shared-cache")
        assert state["models"] == {"flux-tiny": MODEL}
        assert pid_alive(state["coordinator"]["pid"])
        assert "kiln_nodes" in _get(state["coordinator"]["metrics_url"])
        assert [n["node_id"] for n in state["nodes"]] == ["node-1", "node-2"]
        for n in state["nodes"]:
            assert pid_alive(n["pid"]), n
            assert n["package_dir"] == os.path.join(state_dir, "nodes", n["node_id"], "packages")
            assert os.path.isdir(n["package_dir"])
            assert os.path.isfile(os.path.join(state_dir, "logs", n["node_id"] + ".log"))
            assert "kiln_artifact_requests_total" in _get(n["metrics_url"])

        nodes = json.loads(cluster.kiln("nodes", "--json", check=True).stdout)["nodes"]
        assert sorted((n["node_id"], n["state"]) for n in nodes) == [
            ("node-1", "READY"), ("node-2", "READY")]
        table = cluster.kiln("nodes", check=True).stdout
        assert table.splitlines()[0].split() == ["NODE", "STATE", "DEVICE", "RUNNING", "QUEUED",
                                                 "DONE", "LAST", "SEEN"]

        # A second `up` over a running cluster is refused and changes nothing.
        again = kiln("up", "--detach", "--models", f"flux-tiny={MODEL}", "--state-dir", state_dir)
        assert again.returncode == 1
        assert "already running" in again.stderr
        assert cluster.state()["coordinator"]["pid"] == state["coordinator"]["pid"]

        # add-node --fresh: one more node with an empty local package directory.
        stale = os.path.join(state_dir, "nodes", "node-3", "packages", "leftover")
        os.makedirs(stale)
        added = cluster.kiln("add-node", "--fresh", "--json", check=True)
        node3 = json.loads(added.stdout)
        assert node3["node_id"] == "node-3" and pid_alive(node3["pid"])
        assert not os.path.exists(stale)
        assert [n["node_id"] for n in cluster.state()["nodes"]] == ["node-1", "node-2", "node-3"]

        # drain: the node stops taking jobs.
        drained = cluster.kiln("drain", "node-1", check=True)
        assert drained.stdout.startswith("node-1 DRAINING")
    finally:
        down = cluster.down()
    assert down.returncode == 0, down.stderr
    after = cluster.state()
    assert after["state"] == "down"
    assert after["coordinator"]["pid"] == 0
    for n in state["nodes"] + [node3]:
        assert not pid_alive(n["pid"]), n
    assert all(n["pid"] == 0 and n["state"] == "stopped" for n in after["nodes"])
    assert not pid_alive(state["coordinator"]["pid"])
    assert processes_mentioning(state_dir) == []
    # Client commands now say the cluster is down; a second down is harmless.
    gone = cluster.kiln("nodes")
    assert gone.returncode == 1 and "is down" in gone.stderr
    assert cluster.kiln("down").returncode == 0


def test_foreground_up_stops_everything_on_ctrl_c(tmp_path):
    state_dir = str(tmp_path / "state")
    proc = subprocess.Popen([os.path.join(BIN, "kiln"), "up", "--nodes", "1", "--models",
                             f"flux-tiny={MODEL}", "--state-dir", state_dir],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cluster = Cluster(state_dir)
    try:
        wait_until(lambda: os.path.exists(os.path.join(state_dir, "cluster.json"))
                   and cluster.state()["state"] == "up", 90, "the cluster to come up")
        state = cluster.state()
        assert state["detached"] is False and state["supervisor_pid"] == proc.pid
        pids = [state["coordinator"]["pid"]] + [n["pid"] for n in state["nodes"]]
        assert all(pid_alive(p) for p in pids)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "stopping the cluster" in err
        assert not any(pid_alive(p) for p in pids)
        assert cluster.state()["state"] == "down"
    finally:
        if proc.poll() is None:
            proc.kill()
        stop_cluster(cluster)


def test_up_reports_a_node_that_cannot_start(tmp_path):
    """A node that exits at once (here: a model directory it cannot read) fails `up` with the
    node's log, and nothing is left running."""
    state_dir = str(tmp_path / "state")
    bad_model = tmp_path / "not-a-model"
    bad_model.mkdir()
    (bad_model / "model_index.json").write_text("{}")
    proc = kiln("up", "--detach", "--nodes", "1", "--models", f"flux-tiny={bad_model}",
                "--state-dir", state_dir, "--start-timeout", "60", timeout=120)
    assert proc.returncode != 0
    assert "node-1" in proc.stderr and "last lines of" in proc.stderr, proc.stderr
    state = json.load(open(os.path.join(state_dir, "cluster.json")))
    assert state["state"] == "down"
    assert processes_mentioning(state_dir) == []


def test_up_needs_a_model_repository(tmp_path):
    proc = kiln("up", "--detach", "--models", f"flux-tiny={tmp_path}", "--state-dir",
                str(tmp_path / "state"))
    assert proc.returncode == 2
    assert "not a diffusers model repository" in proc.stderr


def _cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().decode().split("\0")


def test_up_passes_compile_options_to_every_node_also_added_ones(tmp_path):
    state_dir = str(tmp_path / "state")
    options = json.dumps({"attention": "cudnn", "max_autotune": False})  # kiln's defaults
    cluster = start_cluster(state_dir, nodes=1, seed_cache=False,
                            extra=("--compile-options", options))
    try:
        assert cluster.state()["compile_options"] == options
        cluster.kiln("add-node", check=True)
        nodes = cluster.state()["nodes"]
        assert [n["node_id"] for n in nodes] == ["node-1", "node-2"]
        for n in nodes:
            assert f"--compile_options={options}" in _cmdline(n["pid"]), n
    finally:
        stop_cluster(cluster)


def test_up_refuses_compile_options_that_are_not_a_json_object(tmp_path):
    proc = kiln("up", "--detach", "--models", f"flux-tiny={MODEL}", "--compile-options", "[1]",
                "--state-dir", str(tmp_path / "state"))
    assert proc.returncode == 2
    assert "compile_options" in proc.stderr
    assert not os.path.exists(str(tmp_path / "state" / "cluster.json"))
