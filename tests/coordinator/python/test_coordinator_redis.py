"""kiln-coordinator in cluster mode (--redis) as real processes: a real redis-server started here
(ephemeral port, AOF with appendfsync always), coordinators on fixed loopback ports so that nodes
and clients reconnect to a restarted or taken-over coordinator, and fake nodes in Python that
behave like kiln-node towards a coordinator (register again when told they are unknown, keep
running their job, list it in heartbeats, deliver its result).

- kill -9 of the coordinator with 50 jobs queued and running, then a restart: every job completes,
  and each result is applied exactly once (counted from Redis's append-only file: one write of
  SUCCEEDED per job);
- kill -9 of the leader with a standby: the standby takes over (the time is measured and
  printed) and every job completes exactly once;
- SIGSTOP of the leader past its lease, a standby takes over, SIGCONT: the old leader writes
  nothing (fencing) and steps down;
- redis-server killed: submits get UNAVAILABLE saying the job was not accepted; Redis restarted:
  served again, acknowledged jobs are still there."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import zmq

from test_coordinator_process import (  # noqa: F401  (pb is a fixture)
    BIN, COORDINATOR, Peer, envelope, pb, spec, tiny_png, wait_until)

pytestmark = [
    pytest.mark.skipif(not COORDINATOR.exists(), reason=f"{COORDINATOR} not built"),
    pytest.mark.skipif(shutil.which("redis-server") is None,
                       reason="redis-server is not installed (Debian: redis-server)"),
]

HEARTBEAT_MS = 200
LEASE_TTL_MS = 2000
JOB_SECONDS = 0.4  # how long a fake node works on one job


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Redis:
    def __init__(self, tmp_path: Path):
        self.dir = tmp_path / "redis"
        self.dir.mkdir()
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
             str(self.dir), "--appendonly", "yes", "--appendfsync", "always", "--save", "",
             "--logfile", str(self.dir / "redis.log")])
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def redis(tmp_path):
    r = Redis(tmp_path)
    yield r
    r.kill()


class ClusterCoordinator:
    """kiln-coordinator --redis on fixed ports; `serving` once it wrote its endpoints file."""

    def __init__(self, tmp_path: Path, name: str, redis: Redis, client_port: int,
                 node_port: int):
        self.name = name
        self.endpoints_file = tmp_path / f"{name}.json"
        self.log_path = tmp_path / f"{name}.log"
        self.log = open(self.log_path, "ab")
        self.client_endpoint = f"tcp://127.0.0.1:{client_port}"
        self.node_endpoint = f"tcp://127.0.0.1:{node_port}"
        self.proc = subprocess.Popen(
            [str(COORDINATOR), "--client_endpoint", self.client_endpoint, "--node_endpoint",
             self.node_endpoint, "--metrics", "127.0.0.1:0", "--heartbeat_ms", str(HEARTBEAT_MS),
             "--endpoints_file", str(self.endpoints_file), "--redis", redis.url,
             "--lease_ttl_ms", str(LEASE_TTL_MS), "--insecure_plaintext"],
            stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def serving(self) -> bool:
        return self.endpoints_file.exists()

    def wait_serving(self, timeout: float = 20) -> None:
        wait_until(lambda: self.serving or self.proc.poll() is not None, timeout,
                   f"{self.name} serving")
        assert self.proc.poll() is None, self.logs()

    def logs(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=10)
        finally:
            self.log.close()


class Node(threading.Thread):
    """A fake node that survives coordinator restarts the way kiln-node does."""

    def __init__(self, pb, ctx, endpoint: str, node_id: str):
        super().__init__(daemon=True)
        self.pb, self.ctx, self.endpoint, self.node_id = pb, ctx, endpoint, node_id
        self.stopped = threading.Event()
        self.results_sent: list[str] = []
        self.error: BaseException | None = None

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=5)
        assert self.error is None, self.error

    def run(self) -> None:
        try:
            self._run()
        except BaseException as e:  # reported by stop()
            self.error = e

    def _run(self) -> None:
        pb = self.pb
        peer = Peer(pb, self.ctx, self.endpoint, identity=self.node_id)
        info = pb.NodeInfo(node_id=self.node_id, models=["flux-tiny"], can_compile=True,
                           device=pb.DeviceInfo(kind="cpu", name="fake cpu"))

        def register() -> None:
            peer.send(envelope(pb, "reg", register_node=pb.RegisterNode(info=info)))

        register()
        job: tuple[str, int, float] | None = None  # (id, attempt, done at)
        next_beat = 0.0
        try:
            while not self.stopped.is_set():
                now = time.monotonic()
                if job and now >= job[2]:
                    peer.send(envelope(pb, result=pb.JobResult(
                        job_id=job[0], ok=True, png=tiny_png(), run_seconds=JOB_SECONDS,
                        attempt=job[1])))
                    self.results_sent.append(job[0])
                    job = None
                if now >= next_beat:
                    running = [job[0]] if job else []
                    peer.send(envelope(pb, heartbeat=pb.Heartbeat(running_jobs=running)))
                    next_beat = now + HEARTBEAT_MS / 2000
                if not peer.sock.poll(10):
                    continue
                env = pb.Envelope()
                env.ParseFromString(peer.sock.recv_multipart()[-1])
                body = env.WhichOneof("body")
                if body == "error" and env.error.code == "FAILED_PRECONDITION":
                    register()  # the coordinator does not know us (it restarted)
                elif body == "assign" and job is None:
                    job = (env.assign.spec.job_id, env.assign.attempt,
                           time.monotonic() + JOB_SECONDS)
                elif body == "cancel_job" and job and job[0] == env.cancel_job.job_id:
                    job = None
        finally:
            peer.sock.close(linger=0)


class Client:
    def __init__(self, pb, ctx, endpoint: str):
        self.pb, self.ctx, self.endpoint = pb, ctx, endpoint
        self.peer = Peer(pb, ctx, endpoint)
        self.n = 0

    def call(self, timeout: float = 5.0, **body):
        """One request; None if no reply came (the coordinator is down): the socket is then
        replaced so that a late reply cannot be mistaken for the next one."""
        self.n += 1
        rid = f"r{self.n}"
        self.peer.send(envelope(self.pb, rid, **body))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.peer.sock.poll(50):
                continue
            env = self.pb.Envelope()
            env.ParseFromString(self.peer.sock.recv_multipart()[-1])
            if env.request_id == rid:
                return env
        self.peer.sock.close(linger=0)
        self.peer = Peer(self.pb, self.ctx, self.endpoint)
        return None

    def submit(self, job_id: str, timeout: float = 5.0):
        return self.call(timeout, submit=self.pb.SubmitRequest(spec=spec(self.pb, job_id)))

    def state(self, job_id: str, timeout: float = 2.0):
        env = self.call(timeout, status=self.pb.StatusRequest(job_id=job_id))
        if env is None or env.WhichOneof("body") != "job":
            return None
        return env.job.job.state


def succeeded_lines(*coordinators: ClusterCoordinator) -> dict[str, int]:
    counts: dict[str, int] = {}
    for c in coordinators:
        for m in re.finditer(r"job (\S+) succeeded on node", c.logs()):
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return counts


def parse_resp_commands(data: bytes) -> list[list[bytes]]:
    """The commands of an AOF file (RESP arrays of bulk strings), in order."""
    commands: list[list[bytes]] = []
    i = 0
    while i < len(data):
        assert data[i:i + 1] == b"*", f"AOF: expected an array at byte {i}"
        end = data.index(b"\r\n", i)
        n = int(data[i + 1:end])
        i = end + 2
        argv = []
        for _ in range(n):
            assert data[i:i + 1] == b"$", f"AOF: expected a bulk string at byte {i}"
            end = data.index(b"\r\n", i)
            size = int(data[i + 1:end])
            argv.append(data[end + 2:end + 2 + size])
            i = end + 2 + size + 2
        commands.append(argv)
    return commands


def results_applied(redis: "Redis", pb, prefix: str = "kiln") -> dict[str, int]:
    """How many times each job was written as SUCCEEDED, read from Redis's append-only file:
    Redis logs each script's effects (HSET P:job:<id> ... state <n> ...), so a result applied
    twice shows as two such writes, whatever the coordinators logged before a kill -9."""
    files = sorted((redis.dir / "appendonlydir").glob("*.aof"))
    assert files, f"no AOF files under {redis.dir}"
    succeeded = str(pb.JOB_STATE_SUCCEEDED).encode()
    key_prefix = f"{prefix}:job:".encode()
    counts: dict[str, int] = {}
    for f in files:
        for argv in parse_resp_commands(f.read_bytes()):
            if argv[0].upper() != b"HSET" or not argv[1].startswith(key_prefix):
                continue
            fields = dict(zip(argv[2::2], argv[3::2]))
            if fields.get(b"state") == succeeded:
                job_id = argv[1][len(key_prefix):].decode()
                counts[job_id] = counts.get(job_id, 0) + 1
    return counts


def wait_all_succeeded(pb, client: Client, ids: list[str], timeout: float) -> None:
    pending = set(ids)
    deadline = time.monotonic() + timeout
    while pending:
        assert time.monotonic() < deadline, f"jobs not finished: {sorted(pending)}"
        for job_id in sorted(pending):
            if client.state(job_id) == pb.JOB_STATE_SUCCEEDED:
                pending.discard(job_id)
        time.sleep(0.1)


def metric(url: str, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if m and m.group(1) == name and dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or "")) == labels:
            return float(m.group(3))
    return 0.0


def metrics_url(c: ClusterCoordinator) -> str:
    import json
    return json.loads(c.endpoints_file.read_text())["metrics_url"]


# ------------------------------------------------------------------------------------------------


def test_kill9_with_jobs_queued_and_running_then_restart(pb, redis, tmp_path):
    ports = (free_port(), free_port())
    ctx = zmq.Context()
    first = ClusterCoordinator(tmp_path, "first", redis, *ports)
    first.wait_serving()
    nodes = [Node(pb, ctx, first.node_endpoint, f"n{i}") for i in range(3)]
    for n in nodes:
        n.start()
    client = Client(pb, ctx, first.client_endpoint)
    ids = [f"job-{i:02d}" for i in range(50)]
    second = None
    try:
        time.sleep(0.5)  # the nodes register
        for job_id in ids:
            reply = client.submit(job_id)
            assert reply is not None and reply.WhichOneof("body") == "job", reply
        # Some done, some running, most queued: kill -9.
        wait_until(lambda: len(succeeded_lines(first)) >= 4, 20, "first results")
        first.proc.kill()
        first.proc.wait()
        done_before = len(succeeded_lines(first))
        second = ClusterCoordinator(tmp_path, "second", redis, *ports)
        second.wait_serving()
        assert re.search(r"recovered \d+ unfinished jobs \(\d+ queued, [1-9]\d* running",
                         second.logs()), second.logs()
        wait_all_succeeded(pb, client, ids, 60)
        # Exactly once, from Redis's own log of writes: every job written SUCCEEDED once.
        applied = results_applied(redis, pb)
        assert applied == {job_id: 1 for job_id in ids}, applied
        counts = succeeded_lines(first, second)
        assert set(counts.values()) == {1}, counts  # and no coordinator logged one twice
        # Submitting again after the restart is idempotent.
        again = client.submit(ids[0])
        assert again.job.created is False and again.job.job.state == pb.JOB_STATE_SUCCEEDED
        print(f"\n{done_before} of {len(ids)} jobs were done at the kill; the restarted "
              f"coordinator finished the rest")
    finally:
        for n in nodes:
            n.stop()
        ctx.destroy(linger=0)
        if second:
            assert second.stop() == 0, second.logs()
        first.stop()


def test_standby_takes_over_when_the_leader_is_killed(pb, redis, tmp_path):
    ports = (free_port(), free_port())
    ctx = zmq.Context()
    leader = ClusterCoordinator(tmp_path, "leader", redis, *ports)
    leader.wait_serving()
    standby = ClusterCoordinator(tmp_path, "standby", redis, *ports)
    nodes = [Node(pb, ctx, leader.node_endpoint, f"n{i}") for i in range(2)]
    for n in nodes:
        n.start()
    client = Client(pb, ctx, leader.client_endpoint)
    ids = [f"job-{i:02d}" for i in range(16)]
    try:
        wait_until(lambda: "standby; leader is" in standby.logs(), 10, "standby")
        assert not standby.serving  # a standby binds nothing
        for job_id in ids:
            assert client.submit(job_id) is not None
        wait_until(lambda: len(succeeded_lines(leader)) >= 3, 20, "first results")
        killed_at = time.monotonic()
        leader.proc.kill()
        leader.proc.wait()
        standby.wait_serving(timeout=10)
        takeover = time.monotonic() - killed_at
        print(f"\nstandby took over {takeover:.2f} s after the leader's kill -9 "
              f"(lease ttl {LEASE_TTL_MS} ms)")
        assert takeover < 5.0
        wait_all_succeeded(pb, client, ids, 60)
        applied = results_applied(redis, pb)  # exactly once (see the restart test)
        assert applied == {job_id: 1 for job_id in ids}, applied
        counts = succeeded_lines(leader, standby)
        assert set(counts.values()) == {1}, counts
        assert metric(metrics_url(standby), "kiln_coordinator_leader") == 1
    finally:
        for n in nodes:
            n.stop()
        ctx.destroy(linger=0)
        assert standby.stop() == 0, standby.logs()
        leader.stop()


def test_a_paused_leader_is_fenced_when_it_wakes(pb, redis, tmp_path):
    ctx = zmq.Context()
    old = ClusterCoordinator(tmp_path, "old", redis, free_port(), free_port())
    old.wait_serving()
    # The standby gets other ports: the paused leader keeps its own bound.
    new = ClusterCoordinator(tmp_path, "new", redis, free_port(), free_port())
    node = Node(pb, ctx, old.node_endpoint, "n-old")
    node.start()
    old_client = Client(pb, ctx, old.client_endpoint)
    new_client = Client(pb, ctx, new.client_endpoint)
    try:
        time.sleep(0.5)
        assert old_client.submit("running-on-old").job.created
        wait_until(lambda: "running-on-old assigned" in old.logs(), 10, "assignment")
        old.proc.send_signal(signal.SIGSTOP)
        # The node finishes its job while the leader sleeps: the result waits in the socket.
        new.wait_serving(timeout=10)
        assert "leading (fencing token" in new.logs()
        assert new_client.submit("after-takeover").job.created
        old.proc.send_signal(signal.SIGCONT)
        # Woken, the old leader handles the queued result and a submit: nothing reaches Redis.
        reply = old_client.call(3.0, submit=pb.SubmitRequest(spec=spec(pb, "to-old-leader")))
        wait_until(lambda: "stepping down" in old.logs(), 10, "old leader stepping down")
        if reply is not None:
            assert reply.WhichOneof("body") == "error", reply
            assert reply.error.code == "UNAVAILABLE", reply
            assert "was not accepted" in reply.error.message, reply
        fenced = "fenced" in old.logs()
        assert new_client.state("to-old-leader") is None  # NOT_FOUND: never stored
        assert new_client.state("running-on-old") != pb.JOB_STATE_SUCCEEDED
        assert new_client.state("after-takeover") is not None
        print(f"\nold leader after SIGCONT: {'writes refused by the fencing token, then ' if fenced else ''}"
              f"stepped down; submit answered {reply.error.code if reply else 'by nobody'}")
        assert old.proc.poll() is None  # a standby again, not crashed
    finally:
        node.stop()
        ctx.destroy(linger=0)
        assert new.stop() == 0, new.logs()
        assert old.stop() == 0, old.logs()


def test_redis_outage_refuses_submits_and_recovers(pb, redis, tmp_path):
    ctx = zmq.Context()
    c = ClusterCoordinator(tmp_path, "c", redis, free_port(), free_port())
    c.wait_serving()
    node = Node(pb, ctx, c.node_endpoint, "n1")
    node.start()
    client = Client(pb, ctx, c.client_endpoint)
    try:
        time.sleep(0.5)
        assert client.submit("before").job.created
        wait_all_succeeded(pb, client, ["before"], 20)
        redis.kill()
        reply = client.submit("during")
        assert reply is not None and reply.WhichOneof("body") == "error", reply
        assert reply.error.code == "UNAVAILABLE", reply
        assert "was not accepted" in reply.error.message, reply.error.message
        assert metric(metrics_url(c), "kiln_job_store_errors_total", kind="unavailable") >= 1
        assert c.proc.poll() is None
        redis.start()
        deadline = time.monotonic() + 20
        while True:
            reply = client.submit("after")
            if reply is not None and reply.WhichOneof("body") == "job":
                break
            assert time.monotonic() < deadline, reply
            time.sleep(0.2)
        wait_all_succeeded(pb, client, ["before", "after"], 20)
        assert client.state("during") is None  # refused, so never stored
        assert metric(metrics_url(c), "kiln_redis_commands_total", client="job_store",
                      result="unavailable") >= 1
    finally:
        node.stop()
        ctx.destroy(linger=0)
        assert c.stop() == 0, c.logs()


def test_bad_redis_flags_exit_2(tmp_path):
    for flags in (["--redis", "/not/a/url"], ["--redis", "redis://127.0.0.1:6379/x"],
                  ["--redis", "redis://127.0.0.1:6379/0", "--lease_ttl_ms", "10"],
                  ["--redis", "redis://127.0.0.1:6379/0", "--retention_s", "0"]):
        proc = subprocess.run([str(COORDINATOR), "--metrics", "127.0.0.1:0", "--insecure_plaintext",
                               *flags],
                              capture_output=True, text=True, timeout=20)
        assert proc.returncode == 2, (flags, proc.stderr)
        assert "error" in proc.stderr.lower()
