"""kiln-coordinator with CURVE as a real process (issue 12): keys made by `kiln keys new`,
allowlists as directories of *.pub files, peers played by pyzmq. An impostor node and a
plaintext peer are refused; a client key added or removed takes effect without a restart
(file change, SIGHUP); the bounds hold under their floods (invalid UTF-8 frames vs the log,
10,000 waits of one client vs another client, idle TCP connections vs /metrics, a node that
keeps a job without a result vs the run timeout)."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import zmq

from test_coordinator_process import (  # noqa: F401  (pb is a fixture)
    BIN, COORDINATOR, Coordinator, Peer, envelope, list_nodes, pb, spec, wait_until)

KILN = BIN / "kiln"
pytestmark = pytest.mark.skipif(not (COORDINATOR.exists() and KILN.exists()),
                                reason="kiln-coordinator or kiln not built")


def keys_new(name: str, directory: Path) -> dict:
    proc = subprocess.run([str(KILN), "keys", "new", name, "--dir", str(directory)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return read_keys(directory / f"{name}.key")


def read_keys(path: Path) -> dict:
    return dict(re.findall(r'(public-key|secret-key) = "([^"]{40})"', path.read_text()))


class CurvePeer(Peer):
    """A Peer whose socket is a CURVE client with `keys` (or plaintext when keys is None)."""

    def __init__(self, pb, ctx, endpoint: str, keys: dict | None, server_public: str,
                 identity: str | None = None):
        self.pb = pb
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if identity:
            self.sock.setsockopt(zmq.IDENTITY, identity.encode())
        if keys is not None:
            self.sock.curve_serverkey = server_public.encode()
            self.sock.curve_publickey = keys["public-key"].encode()
            self.sock.curve_secretkey = keys["secret-key"].encode()
        self.sock.connect(endpoint)

    def answered(self, env, timeout: float = 1.5) -> bool:
        self.send(env)
        return bool(self.sock.poll(int(timeout * 1000)))


class Secured:
    """Keys and allowlists in tmp_path, and a coordinator using them."""

    def __init__(self, tmp_path: Path, *extra: str):
        self.dir = tmp_path / "keys"
        for d in ("nodes", "clients", "admins"):
            (self.dir / d).mkdir(parents=True)
        self.server = keys_new("coordinator", self.dir)
        self.node = keys_new("node-1", self.dir / "nodes")
        self.alice = keys_new("alice", self.dir / "clients")
        self.admin = keys_new("admin", self.dir / "admins")
        self.coordinator = Coordinator(
            tmp_path, "--key", str(self.dir / "coordinator.key"),
            "--node_keys", str(self.dir / "nodes"), "--client_keys", str(self.dir / "clients"),
            "--admin_keys", str(self.dir / "admins"), *extra)

    def client(self, pb, keys):
        c = self.coordinator
        return CurvePeer(pb, c.ctx, c.client_endpoint, keys, self.server["public-key"])

    def node_peer(self, pb, keys, identity: str):
        c = self.coordinator
        return CurvePeer(pb, c.ctx, c.node_endpoint, keys, self.server["public-key"], identity)

    def register(self, pb, peer, node_id: str):
        info = pb.NodeInfo(node_id=node_id, models=["flux-tiny"], can_compile=True,
                           device=pb.DeviceInfo(kind="cpu", name="fake cpu"))
        reply = peer.call(envelope(pb, "reg", register_node=pb.RegisterNode(info=info)))
        assert reply.WhichOneof("body") == "register_ack", reply


@pytest.fixture
def secured(tmp_path):
    # A 1.5 s run timeout: the minimum decides (the cost model's priors expect a compile).
    s = Secured(tmp_path, "--run_timeout_min_ms", "1500", "--run_timeout_factor", "0.0001")
    yield s
    assert s.coordinator.stop() == 0, s.coordinator.logs()


def test_keys_new_writes_a_private_pair_and_refuses_to_overwrite(tmp_path):
    keys = keys_new("alice", tmp_path)
    assert stat.S_IMODE(os.stat(tmp_path / "alice.key").st_mode) == 0o600
    assert keys["secret-key"] not in (tmp_path / "alice.pub").read_text()
    assert read_keys(tmp_path / "alice.pub")["public-key"] == keys["public-key"]
    again = subprocess.run([str(KILN), "keys", "new", "alice", "--dir", str(tmp_path)],
                           capture_output=True, text=True, timeout=30)
    assert again.returncode == 2 and "exists" in again.stderr, again.stderr


def test_the_coordinator_needs_a_key_or_an_explicit_plaintext_flag(tmp_path):
    proc = subprocess.run([str(COORDINATOR), "--metrics", "127.0.0.1:0"], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2 and "--insecure_plaintext" in proc.stderr, proc.stderr
    c = Coordinator(tmp_path)  # the helper passes --insecure_plaintext
    try:
        assert "INSECURE" in c.logs()
    finally:
        assert c.stop() == 0


def test_an_impostor_node_and_plaintext_peers_are_refused(pb, secured):
    stranger = {"public-key": "", "secret-key": ""}
    stranger["public-key"], stranger["secret-key"] = (
        k.decode() for k in zmq.curve_keypair())
    impostor = secured.node_peer(pb, stranger, "node-1")
    info = pb.NodeInfo(node_id="node-1", models=["flux-tiny"],
                       device=pb.DeviceInfo(kind="cpu"))
    assert not impostor.answered(envelope(pb, "reg", register_node=pb.RegisterNode(info=info)))
    plain_node = secured.node_peer(pb, None, "node-1")
    assert not plain_node.answered(envelope(pb, "reg",
                                            register_node=pb.RegisterNode(info=info)))
    plain_client = secured.client(pb, None)
    assert not plain_client.answered(list_nodes(pb))
    admin = secured.client(pb, secured.admin)
    assert len(admin.call(list_nodes(pb)).nodes.nodes) == 0
    assert secured.coordinator.metric("kiln_auth_handshakes_total", domain="node",
                                       result="refused") >= 1
    # The real node gets in.
    secured.register(pb, secured.node_peer(pb, secured.node, "node-1"), "node-1")
    # The CLI says why when its key is refused.
    stranger_dir = secured.dir / "elsewhere"
    keys_new("mallory", stranger_dir)
    proc = subprocess.run(
        [str(KILN), "nodes", "--coordinator", secured.coordinator.client_endpoint, "--key",
         str(stranger_dir / "mallory.key"), "--server-key", str(secured.dir / "coordinator.pub"),
         "--retry-for", "0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "refused this client's CURVE handshake" in proc.stderr, \
        proc.stderr
    ok = subprocess.run(
        [str(KILN), "nodes", "--coordinator", secured.coordinator.client_endpoint, "--key",
         str(secured.dir / "admins" / "admin.key"), "--server-key",
         str(secured.dir / "coordinator.pub")], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "node-1" in ok.stdout, ok.stderr


def test_client_keys_rotate_without_a_restart(pb, secured):
    pid = secured.coordinator.proc.pid
    bob_dir = secured.dir / "pending"
    bob = keys_new("bob", bob_dir)
    assert not secured.client(pb, bob).answered(list_nodes(pb))
    shutil.copy(bob_dir / "bob.pub", secured.dir / "clients" / "bob.pub")  # noticed on change
    wait_until(lambda: secured.client(pb, bob).answered(list_nodes(pb), 0.5), 10, "bob let in")
    # Revoke alice, and tell the coordinator with SIGHUP.
    (secured.dir / "clients" / "alice.pub").unlink()
    secured.coordinator.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: not secured.client(pb, secured.alice).answered(list_nodes(pb), 0.5), 10,
               "alice refused")
    assert secured.coordinator.proc.pid == pid and secured.coordinator.proc.poll() is None
    assert secured.coordinator.metric("kiln_auth_reloads_total", result="ok") >= 2


def test_an_invalid_utf8_flood_does_not_flood_the_log(pb, secured):
    admin = secured.client(pb, secured.admin)
    env = envelope(pb, "u", submit=pb.SubmitRequest(spec=spec(pb, "utf8", prompt="AAAAAAAA")))
    frame = env.SerializeToString().replace(b"AAAAAAAA", b"\xff\xfe" * 4)
    before = secured.coordinator.log_path.stat().st_size
    for _ in range(20000):
        admin.sock.send(frame)
    wait_until(lambda: secured.coordinator.metric(
        "kiln_protocol_errors_total", socket="client", reason="malformed") >= 20000, 30,
        "every frame answered")
    grown = secured.coordinator.log_path.stat().st_size - before
    assert grown < 20000, f"log grew by {grown} bytes for 20,000 bad frames"
    assert "protobuf" in secured.coordinator.logs()


def test_ten_thousand_waits_of_one_client_do_not_lock_out_another(pb, secured):
    node = secured.node_peer(pb, secured.node, "node-1")
    secured.register(pb, node, "node-1")
    alice = secured.client(pb, secured.alice)
    alice.call(envelope(pb, "s", submit=pb.SubmitRequest(spec=spec(pb, "held"))))
    wait = envelope(pb, "w", wait=pb.WaitRequest(job_id="held", timeout_ms=2**32 - 1))
    for _ in range(10000):
        alice.send(wait)
    admin = secured.client(pb, secured.admin)
    start = time.monotonic()
    reply = admin.call(envelope(pb, "w2", wait=pb.WaitRequest(job_id="held", timeout_ms=100)),
                       timeout=5)
    assert reply.WhichOneof("body") == "job", reply
    assert time.monotonic() - start < 5
    # Alice's oldest waits were answered and dropped: at most 1000 stay pending.
    answered = 0
    while alice.sock.poll(2000):
        alice.sock.recv()
        answered += 1
    assert answered >= 9000, answered


def test_idle_connections_do_not_block_metrics(secured):
    port = int(secured.coordinator.metrics_url.split(":")[2].split("/")[0])
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
    try:
        for _ in range(3):
            start = time.monotonic()
            with urllib.request.urlopen(secured.coordinator.metrics_url, timeout=10) as r:
                assert r.status == 200
            assert time.monotonic() - start < 1.0
    finally:
        for s in idle:
            s.close()


def test_a_job_held_without_a_result_is_requeued_and_its_node_marked_suspect(pb, secured):
    node = secured.node_peer(pb, secured.node, "node-1")
    secured.register(pb, node, "node-1")
    admin = secured.client(pb, secured.admin)
    admin.call(envelope(pb, "s", submit=pb.SubmitRequest(spec=spec(pb, "stuck"))))
    deadline = time.monotonic() + 10
    state = None
    while time.monotonic() < deadline:
        # Heartbeats that list the job, and never a result.
        node.send(envelope(pb, heartbeat=pb.Heartbeat(running_jobs=["stuck"])))
        while node.sock.poll(0):
            node.sock.recv()
        job = admin.call(envelope(pb, "st", status=pb.StatusRequest(job_id="stuck"))).job.job
        state = job.state
        if state == pb.JOB_STATE_QUEUED and "run timeout" in job.error:
            break
        time.sleep(0.1)
    assert state == pb.JOB_STATE_QUEUED, state
    nodes = admin.call(list_nodes(pb)).nodes.nodes
    assert nodes[0].state == pb.NODE_STATE_DRAINING
    assert secured.coordinator.metric("kiln_job_run_timeouts_total") == 1
