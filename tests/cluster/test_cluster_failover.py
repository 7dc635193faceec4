"""Clients and nodes given every coordinator endpoint carry on through a failover or a restart,
and a foreground `kiln up` restarts the children that die. Real processes throughout: a
redis-server started here (ephemeral port, AOF with appendfsync always), kiln-coordinator --redis
on fixed loopback ports, kiln-node, and the `kiln` CLI.

- `kiln generate --coordinator A,B` with a kiln-node given both node endpoints: kill -9 of the
  leader A mid-job; the standby B takes over, the node rotates to it and delivers, and generate
  exits 0 with the reference image;
- `kiln wait` outlives a coordinator restart (down for several seconds, then back on its ports):
  it retries instead of failing, and the job finishes;
- foreground `kiln up`: kill -9 of the coordinator and of a node; both are restarted, cluster.json
  follows the new pids, the node registers again, and Ctrl-C leaves nothing running;
- `kiln up --redis local`: a supervised redis-server with AOF under the state directory; a job
  finished before `kiln down` is still there after the next `kiln up --redis local`;
- --advertise: bound to 0.0.0.0, the endpoints file, the node's registered metrics URL and
  service discovery carry the advertised host, and those addresses answer."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from cluster_support import (BIN, MODEL, Cluster, kiln, pid_alive, processes_mentioning,
                             requires_cluster, seed_shared_cache, stop_cluster, wait_until)

pytestmark = [
    requires_cluster,
    pytest.mark.skipif(shutil.which("redis-server") is None,
                       reason="redis-server is not installed (Debian: redis-server)"),
]

HEARTBEAT_MS = 200
LEASE_TTL_MS = 2000
PROMPT = "a lighthouse on a cliff at dusk"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Redis:
    """redis-server on an ephemeral loopback port, AOF with appendfsync always."""

    def __init__(self, root: Path):
        self.dir = root / "redis"
        self.dir.mkdir()
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
             str(self.dir), "--appendonly", "yes", "--appendfsync", "always", "--save", "",
             "--logfile", str(self.dir / "redis.log")])

        def pong() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    return s.recv(16).startswith(b"+PONG")
            except OSError:
                return False

        wait_until(pong, 10, "redis-server to answer PING", interval=0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Coordinator:
    """kiln-coordinator --redis on fixed ports (a restart binds the same ones)."""

    def __init__(self, root: Path, name: str, redis: Redis, client_port: int, node_port: int):
        self.root, self.name, self.redis = root, name, redis
        self.client_endpoint = f"tcp://127.0.0.1:{client_port}"
        self.node_endpoint = f"tcp://127.0.0.1:{node_port}"
        self.endpoints_file = root / f"{name}.json"
        self.log_path = root / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        if self.endpoints_file.exists():
            self.endpoints_file.unlink()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [os.path.join(BIN, "kiln-coordinator"), "--client_endpoint", self.client_endpoint,
                 "--node_endpoint", self.node_endpoint, "--metrics", "127.0.0.1:0",
                 "--heartbeat_ms", str(HEARTBEAT_MS), "--endpoints_file",
                 str(self.endpoints_file), "--redis", self.redis.url, "--lease_ttl_ms",
                 str(LEASE_TTL_MS), "--insecure_plaintext"],
                stdout=log, stderr=subprocess.STDOUT)

    def wait_serving(self, timeout: float = 30) -> None:
        wait_until(lambda: self.endpoints_file.exists() or self.proc.poll() is not None, timeout,
                   f"{self.name} to serve")
        assert self.proc.poll() is None, self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


def start_node(root: Path, node_id: str, coordinators: str) -> subprocess.Popen:
    """kiln-node with the fixture packages in its local package tier (nothing to compile)."""
    package_dir = root / node_id / "packages"
    seed_shared_cache(str(package_dir))
    log = open(root / f"{node_id}.log", "ab")
    return subprocess.Popen(
        [os.path.join(BIN, "kiln-node"), "--coordinator", coordinators, "--node_id", node_id,
         "--models", f"flux-tiny={MODEL}", "--device", "cpu", "--precision", "fp32",
         "--package_dir", str(package_dir), "--metrics", "127.0.0.1:0", "--heartbeat_ms",
         str(HEARTBEAT_MS), "--no_compile", "--insecure_plaintext"],
        stdout=log, stderr=subprocess.STDOUT)


def job_info(coordinators: str, job_id: str) -> dict | None:
    proc = kiln("status", job_id, "--json", "--coordinator", coordinators, "--retry-for", "0",
                "--request-timeout", "2")
    return json.loads(proc.stdout) if proc.returncode == 0 else None


@pytest.fixture
def redis(tmp_path):
    r = Redis(tmp_path)
    yield r
    r.stop()


def test_generate_and_node_carry_on_through_a_leader_kill(tmp_path, redis, references):
    a = Coordinator(tmp_path, "a", redis, free_port(), free_port())
    a.wait_serving()
    b = Coordinator(tmp_path, "b", redis, free_port(), free_port())  # standby: binds nothing
    clients = f"{a.client_endpoint},{b.client_endpoint}"
    node = start_node(tmp_path, "node-1", f"{a.node_endpoint},{b.node_endpoint}")
    generate = None
    try:
        wait_until(lambda: '"READY"' in kiln("nodes", "--json", "--coordinator",
                                             a.client_endpoint).stdout,
                   60, "node-1 to register")
        seed, steps, job_id = 11, 30, "through-failover"
        out = tmp_path / "out.png"
        generate = subprocess.Popen(
            [os.path.join(BIN, "kiln"), "generate", "--coordinator", clients, "--prompt", PROMPT,
             "--seed", str(seed), "--steps", str(steps), "--job-id", job_id, "--out", str(out),
             "--no-progress"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def denoising():
            info = job_info(a.client_endpoint, job_id)
            return info if info and info["state"] == "RUNNING" and info["step"] >= 1 else None

        wait_until(denoising, 120, "the job to start denoising", interval=0.05)
        killed_at = time.monotonic()
        a.kill()
        stdout, stderr = generate.communicate(timeout=240)
        assert generate.returncode == 0, stderr
        print(f"generate finished {time.monotonic() - killed_at:.1f}s after the leader's kill -9")
        assert "retrying on" in stderr, stderr  # a note, not an error
        assert stdout.strip() == str(out)
        assert out.read_bytes() == references(PROMPT, seed, steps)
        # The node went over to the new leader on its own.
        nodes = json.loads(kiln("nodes", "--json", "--coordinator", clients,
                                check=True).stdout)["nodes"]
        assert [(n["node_id"], n["state"]) for n in nodes] == [("node-1", "READY")]
        assert node.poll() is None
        assert b.proc.poll() is None
    finally:
        if generate and generate.poll() is None:
            generate.kill()
        node.terminate()
        node.wait(timeout=30)
        a.stop()
        b.stop()


def test_wait_outlives_a_coordinator_restart(tmp_path, redis, references):
    c = Coordinator(tmp_path, "c", redis, free_port(), free_port())
    c.wait_serving()
    node = start_node(tmp_path, "node-1", c.node_endpoint)
    waiter = None
    try:
        wait_until(lambda: '"READY"' in kiln("nodes", "--json", "--coordinator",
                                             c.client_endpoint).stdout,
                   60, "node-1 to register")
        seed, steps, job_id = 5, 30, "waits-through-restart"
        kiln("submit", "--coordinator", c.client_endpoint, "--prompt", PROMPT, "--seed",
             str(seed), "--steps", str(steps), "--job-id", job_id, check=True)
        out = tmp_path / "out.png"
        waiter = subprocess.Popen(
            [os.path.join(BIN, "kiln"), "wait", job_id, "--coordinator", c.client_endpoint,
             "--json", "--no-progress", "--out", str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: (job_info(c.client_endpoint, job_id) or {}).get("state") == "RUNNING",
                   120, "the job to run")
        c.kill()
        time.sleep(6)  # down for a while; the node keeps running the job
        assert waiter.poll() is None, waiter.communicate()
        c.start()
        c.wait_serving()
        stdout, stderr = waiter.communicate(timeout=180)
        assert waiter.returncode == 0, stderr
        assert json.loads(stdout)["state"] == "SUCCEEDED"
        assert "retrying on " + c.client_endpoint in stderr
        assert out.read_bytes() == references(PROMPT, seed, steps)
    finally:
        if waiter and waiter.poll() is None:
            waiter.kill()
        node.terminate()
        node.wait(timeout=30)
        c.stop()


def test_foreground_up_restarts_what_dies(tmp_path):
    state_dir = str(tmp_path / "state")
    seed_shared_cache(os.path.join(state_dir, "shared-cache"))
    proc = subprocess.Popen([os.path.join(BIN, "kiln"), "up", "--nodes", "1", "--models",
                             f"flux-tiny={MODEL}", "--state-dir", state_dir, "--heartbeat-ms",
                             "300"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cluster = Cluster(state_dir)
    try:
        wait_until(lambda: os.path.exists(os.path.join(state_dir, "cluster.json"))
                   and cluster.state()["state"] == "up", 90, "the cluster to come up")
        before = cluster.state()
        old_coordinator = before["coordinator"]["pid"]
        os.kill(old_coordinator, signal.SIGKILL)

        def new_coordinator():
            pid = cluster.state()["coordinator"]["pid"]
            return pid if pid not in (0, old_coordinator) and pid_alive(pid) else None

        pid = wait_until(new_coordinator, 60, "the coordinator to be restarted")
        state = cluster.state()
        # Same endpoints: the node and clients find it where it was.
        assert state["coordinator"]["client_endpoint"] == before["coordinator"]["client_endpoint"]
        assert state["coordinator"]["node_endpoint"] == before["coordinator"]["node_endpoint"]

        def node_ready():
            proc_nodes = cluster.kiln("nodes", "--json")
            if proc_nodes.returncode != 0:
                return False
            nodes = json.loads(proc_nodes.stdout)["nodes"]
            return [(n["node_id"], n["state"]) for n in nodes] == [("node-1", "READY")]

        wait_until(node_ready, 60, "node-1 to register with the restarted coordinator")
        out = tmp_path / "after-restart.png"
        cluster.kiln("generate", "--prompt", PROMPT, "--steps", "1", "--out", str(out),
                     "--no-progress", check=True)

        old_node = cluster.node("node-1")["pid"]
        os.kill(old_node, signal.SIGKILL)

        def new_node():
            n = cluster.node("node-1")
            return n["pid"] not in (0, old_node) and pid_alive(n["pid"]) and n["state"] == "up"

        wait_until(new_node, 60, "node-1 to be restarted")
        wait_until(node_ready, 60, "the restarted node-1 to register")

        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, err
        assert "the coordinator (pid %d) exited; restarting it" % old_coordinator in err
        assert "coordinator restarted (pid %d" % pid in err
        assert "node-1 restarted" in err
        assert cluster.state()["state"] == "down"
        assert processes_mentioning(state_dir) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        stop_cluster(cluster)


def test_up_with_local_redis_keeps_jobs_across_down_and_up(tmp_path):
    """`kiln up --redis local`: a redis-server with AOF under the state directory, the
    coordinator on it, the nodes using it as their shared cache; `kiln down` stops it too, and
    a later `kiln up --redis local` finds the finished job again."""
    state_dir = str(tmp_path / "state")
    # Nothing to compile: node-1's local package tier holds the fixture packages.
    seed_shared_cache(os.path.join(state_dir, "nodes", "node-1", "packages"))
    args = ("up", "--detach", "--nodes", "1", "--models", f"flux-tiny={MODEL}", "--state-dir",
            state_dir, "--heartbeat-ms", "300", "--redis", "local")
    up = kiln(*args, timeout=180)
    cluster = Cluster(state_dir, up.stdout)
    try:
        assert up.returncode == 0, up.stderr
        state = cluster.state()
        redis = state["redis"]
        assert pid_alive(redis["pid"]) and redis["dir"] == os.path.join(state_dir, "redis")
        assert state["redis_url"] == f"redis://127.0.0.1:{redis['port']}/0"
        assert state["shared_cache"] == state["redis_url"]
        assert "redis        " + state["redis_url"] in up.stdout
        cmdline = open(f"/proc/{state['coordinator']['pid']}/cmdline").read().split("\0")
        assert "--redis=" + state["redis_url"] in cmdline
        node_cmdline = open(f"/proc/{state['nodes'][0]['pid']}/cmdline").read().split("\0")
        assert "--shared_cache=" + state["redis_url"] in node_cmdline
        out = tmp_path / "kept.png"
        cluster.kiln("generate", "--prompt", PROMPT, "--steps", "1", "--job-id", "kept",
                     "--out", str(out), "--no-progress", check=True)
        assert os.listdir(os.path.join(state_dir, "redis")), "no AOF under STATE/redis"

        down = cluster.down()
        assert down.returncode == 0, down.stderr
        assert "stopping redis-server" in down.stderr
        assert not pid_alive(redis["pid"])
        assert processes_mentioning(state_dir) == []

        again = kiln(*args, timeout=180)
        assert again.returncode == 0, again.stderr
        info = json.loads(cluster.kiln("status", "kept", "--json", check=True).stdout)
        assert info["state"] == "SUCCEEDED"  # from the AOF, through a new coordinator
    finally:
        stop_cluster(cluster)
        state = cluster.state()
        if state["redis"]["pid"] and pid_alive(state["redis"]["pid"]):
            os.kill(state["redis"]["pid"], signal.SIGKILL)


def test_advertised_addresses_reach_the_processes(tmp_path):
    """Bound to every interface, advertised as other loopback addresses (127.0.0.2 for the
    coordinator, 127.0.0.3 for the node: reachable, and unlike what was bound): the endpoints
    file, the node's registered metrics URL and service discovery carry them, and they answer."""
    endpoints_file = tmp_path / "coordinator.json"
    log = open(tmp_path / "coordinator.log", "ab")
    coordinator = subprocess.Popen(
        [os.path.join(BIN, "kiln-coordinator"), "--client_endpoint", "tcp://0.0.0.0:0",
         "--node_endpoint", "tcp://0.0.0.0:0", "--metrics", "0.0.0.0:0", "--advertise",
         "127.0.0.2", "--endpoints_file", str(endpoints_file), "--heartbeat_ms",
         str(HEARTBEAT_MS), "--insecure_plaintext"],
        stdout=log, stderr=subprocess.STDOUT)
    node = None
    try:
        wait_until(endpoints_file.exists, 30, "the endpoints file")
        endpoints = json.loads(endpoints_file.read_text())
        assert endpoints["client_endpoint"].startswith("tcp://127.0.0.2:")
        assert endpoints["node_endpoint"].startswith("tcp://127.0.0.2:")
        assert endpoints["metrics_url"].startswith("http://127.0.0.2:")
        with urllib.request.urlopen(endpoints["metrics_url"], timeout=10) as r:
            assert "kiln_nodes" in r.read().decode()

        package_dir = tmp_path / "node-a" / "packages"
        package_dir.mkdir(parents=True)
        node = subprocess.Popen(
            [os.path.join(BIN, "kiln-node"), "--coordinator", endpoints["node_endpoint"],
             "--node_id", "node-a", "--models", f"flux-tiny={MODEL}", "--package_dir",
             str(package_dir), "--metrics", "0.0.0.0:0", "--advertise", "127.0.0.3",
             "--heartbeat_ms", str(HEARTBEAT_MS), "--no_compile", "--insecure_plaintext"],
            stdout=open(tmp_path / "node-a.log", "ab"), stderr=subprocess.STDOUT)

        def registered():
            proc = kiln("nodes", "--json", "--coordinator", endpoints["client_endpoint"])
            nodes = json.loads(proc.stdout)["nodes"] if proc.returncode == 0 else []
            return nodes[0] if nodes else None

        info = wait_until(registered, 60, "node-a to register")
        assert info["metrics_url"].startswith("http://127.0.0.3:"), info
        with urllib.request.urlopen(info["metrics_url"], timeout=10) as r:
            assert "kiln_node" in r.read().decode()
        sd_url = endpoints["metrics_url"].rsplit("/metrics", 1)[0] + "/sd"

        def discovered():
            with urllib.request.urlopen(sd_url, timeout=10) as r:
                return "127.0.0.3:" in r.read().decode()

        wait_until(discovered, 30, "service discovery to list node-a at 127.0.0.3")

        bad = subprocess.run([os.path.join(BIN, "kiln-node"), "--coordinator",
                              endpoints["node_endpoint"], "--models", f"flux-tiny={MODEL}",
                              "--advertise", "http://127.0.0.3", "--insecure_plaintext"],
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and "--advertise" in bad.stderr, bad.stderr
    finally:
        if node:
            node.terminate()
            node.wait(timeout=30)
        coordinator.terminate()
        coordinator.wait(timeout=30)
