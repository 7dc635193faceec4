"""`kiln up --advertise HOST`: the coordinator and the nodes it starts bind every interface and
advertise HOST — in cluster.json, the coordinator's endpoints and the metrics URLs the nodes
register (the status board's service discovery). HOST here is 127.0.0.2: on Linux all of 127/8
is loopback, so it reaches this machine, but only a socket bound to every interface (not one
bound to 127.0.0.1) answers there — so the test fails if the binds stay on 127.0.0.1."""
from __future__ import annotations

import json
import socket
import urllib.request

import pytest

from cluster_support import MODEL, kiln, requires_cluster, start_cluster, stop_cluster, wait_until

pytestmark = requires_cluster

HOST = "127.0.0.2"


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def _reachable() -> bool:
    try:
        with socket.socket() as s:
            s.bind((HOST, 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _reachable(), reason=f"{HOST} is not a loopback address here")
def test_up_advertise_reaches_every_process_at_the_advertised_host(tmp_path):
    state_dir = str(tmp_path / "state")
    cluster = start_cluster(state_dir, nodes=1, extra=("--advertise", HOST))
    try:
        state = cluster.state()
        assert state["advertise"] == HOST
        coord = state["coordinator"]
        for key in ("client_endpoint", "node_endpoint"):
            assert coord[key].startswith(f"tcp://{HOST}:"), coord
        assert coord["metrics_url"].startswith(f"http://{HOST}:"), coord
        assert "kiln_nodes" in _get(coord["metrics_url"])
        node = state["nodes"][0]
        assert node["metrics_url"].startswith(f"http://{HOST}:"), node
        assert "kiln_artifact_requests_total" in _get(node["metrics_url"])
        # The node registered its advertised metrics URL; the CLI reaches the coordinator at HOST.
        # (the status board's snapshot is refreshed once a second)
        target = node["metrics_url"].split("//")[1].split("/")[0]
        sd_url = coord["metrics_url"].replace("/metrics", "/sd")
        wait_until(lambda: [t for entry in json.loads(_get(sd_url)) for t in entry["targets"]]
                   == [target], 10, f"{target} in {sd_url}")
        nodes = json.loads(cluster.kiln("nodes", "--json", check=True).stdout)["nodes"]
        assert [(n["node_id"], n["state"]) for n in nodes] == [("node-1", "READY")]
    finally:
        stop_cluster(cluster)


def test_up_refuses_a_bad_advertise_host(tmp_path):
    proc = kiln("up", "--detach", "--nodes", "1", "--models", f"flux-tiny={MODEL}",
                "--state-dir", str(tmp_path / "state"), "--advertise", "tcp://10.0.0.1:5")
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "advertise" in proc.stderr, proc.stderr
    assert not (tmp_path / "state" / "cluster.json").exists()
