"""Three hosts on one machine: network namespaces joined by veth pairs (`ip netns`, needs root).

    host C (Redis + kiln-coordinator --redis, 0.0.0.0, --advertise)
      10.231.1.1 ── veth ── 10.231.1.2  host A (kiln-node --advertise 10.231.1.2)
      10.231.2.1 ── veth ── 10.231.2.2  host B (kiln-node --advertise 10.231.2.2)

Jobs run across A and B; cutting B's link mid-job makes the coordinator declare B dead and
requeue its job on A, which finishes it with the reference image; from C's namespace every
advertised metrics URL answers. Where namespaces cannot be made (not root, no `ip`, no veth), the
test skips and says why."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from cluster_support import (BIN, MODEL, PYTHON, requires_cluster, seed_shared_cache,
                             wait_until)

pytestmark = [
    requires_cluster,
    pytest.mark.skipif(shutil.which("redis-server") is None,
                       reason="redis-server is not installed (Debian: redis-server)"),
]

HEARTBEAT_MS = 300
PROMPT = "a red fox in fresh snow"


def sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=30)


class Hosts:
    """Namespaces c, a, b; c joined to a and to b by one veth pair each."""

    def __init__(self):
        tag = uuid.uuid4().hex[:6]
        self.ns = {h: f"kiln-{tag}-{h}" for h in "cab"}
        self.link = {h: f"k{tag}{h}" for h in "ab"}  # C's end of the pair to host h
        self.made: list[str] = []

    def make(self) -> str | None:
        """None when made, else why not."""
        if os.geteuid() != 0:
            return "needs root to make network namespaces"
        if shutil.which("ip") is None:
            return "the `ip` command is missing (Debian: iproute2)"
        for ns in self.ns.values():
            r = sh("ip", "netns", "add", ns)
            if r.returncode != 0:
                return f"ip netns add failed: {r.stderr.strip()}"
            self.made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        for i, h in enumerate("ab", start=1):
            peer = self.link[h] + "p"
            r = sh("ip", "link", "add", self.link[h], "netns", self.ns["c"], "type", "veth",
                   "peer", "name", peer, "netns", self.ns[h])
            if r.returncode != 0:
                return f"cannot make a veth pair: {r.stderr.strip()}"
            for ns, dev, addr in ((self.ns["c"], self.link[h], f"10.231.{i}.1/24"),
                                  (self.ns[h], peer, f"10.231.{i}.2/24")):
                for cmd in (("addr", "add", addr, "dev", dev), ("link", "set", dev, "up")):
                    r = sh("ip", "-n", ns, *cmd)
                    if r.returncode != 0:
                        return f"ip -n {ns} {' '.join(cmd)}: {r.stderr.strip()}"
        return None

    def cut(self, h: str) -> None:
        """Takes host h off the network (its link on C's side goes down)."""
        r = sh("ip", "-n", self.ns["c"], "link", "set", self.link[h], "down")
        assert r.returncode == 0, r.stderr

    def run(self, h: str, *args: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.ns[h], *args], **kw)

    def kiln(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.ns["c"], os.path.join(BIN, "kiln"),
                               *args], capture_output=True, text=True, timeout=300)

    def remove(self) -> None:
        for ns in self.made:
            sh("ip", "netns", "del", ns)


@pytest.fixture
def hosts():
    h = Hosts()
    why = h.make()
    if why is not None:
        h.remove()
        pytest.skip(f"three hosts on one machine: {why}")
    yield h
    h.remove()


def test_three_hosts_jobs_across_nodes_and_a_cut_link_requeues(hosts, tmp_path: Path,
                                                               references):
    procs: list[subprocess.Popen] = []

    def start(h: str, name: str, *args: str) -> subprocess.Popen:
        log = open(tmp_path / f"{name}.log", "ab")
        p = hosts.run(h, *args, stdout=log, stderr=subprocess.STDOUT)
        procs.append(p)
        return p

    try:
        redis_dir = tmp_path / "redis"
        redis_dir.mkdir()
        start("c", "redis", "redis-server", "--port", "6379", "--bind", "0.0.0.0",
              "--protected-mode", "no", "--dir", str(redis_dir), "--appendonly", "yes",
              "--appendfsync", "always", "--save", "")
        endpoints_file = tmp_path / "coordinator.json"
        start("c", "coordinator", os.path.join(BIN, "kiln-coordinator"), "--redis",
              "redis://127.0.0.1:6379/0", "--client_endpoint", "tcp://0.0.0.0:7700",
              "--node_endpoint", "tcp://0.0.0.0:7701", "--metrics", "0.0.0.0:9400",
              "--advertise", "10.231.1.1", "--heartbeat_ms", str(HEARTBEAT_MS),
              "--endpoints_file", str(endpoints_file), "--insecure_plaintext")
        wait_until(endpoints_file.exists, 60, "the coordinator to serve")
        endpoints = json.loads(endpoints_file.read_text())
        assert endpoints["client_endpoint"] == "tcp://10.231.1.1:7700"
        assert endpoints["metrics_url"] == "http://10.231.1.1:9400/metrics"
        client = endpoints["client_endpoint"]

        def node(h: str, i: int) -> None:
            package_dir = tmp_path / f"node-{h}" / "packages"
            seed_shared_cache(str(package_dir))  # nothing to compile
            start(h, f"node-{h}", os.path.join(BIN, "kiln-node"), "--coordinator",
                  f"tcp://10.231.{i}.1:7701", "--node_id", f"node-{h}", "--models",
                  f"flux-tiny={MODEL}", "--package_dir", str(package_dir), "--metrics",
                  "0.0.0.0:9401", "--advertise", f"10.231.{i}.2", "--heartbeat_ms",
                  str(HEARTBEAT_MS), "--no_compile", "--insecure_plaintext")

        def nodes() -> dict:
            r = hosts.kiln("nodes", "--json", "--coordinator", client, "--retry-for", "0")
            return {n["node_id"]: n for n in json.loads(r.stdout)["nodes"]} \
                if r.returncode == 0 else {}

        node("b", 2)  # B alone first, so the long job goes to B
        wait_until(lambda: nodes().get("node-b", {}).get("state") == "READY", 90,
                   "node-b to register")
        seed, steps, job_id = 21, 30, "cut-link"
        r = hosts.kiln("submit", "--coordinator", client, "--prompt", PROMPT, "--seed",
                       str(seed), "--steps", str(steps), "--job-id", job_id)
        assert r.returncode == 0, r.stderr

        def denoising():
            s = hosts.kiln("status", job_id, "--json", "--coordinator", client)
            info = json.loads(s.stdout) if s.returncode == 0 else {}
            return info.get("state") == "RUNNING" and info.get("step", 0) >= 1

        wait_until(denoising, 120, "the job to start denoising on node-b", interval=0.05)
        node("a", 1)
        wait_until(lambda: nodes().get("node-a", {}).get("state") == "READY", 90,
                   "node-a to register")
        # Every advertised metrics URL answers from C's namespace.
        for url in [n["metrics_url"] for n in nodes().values()] + [endpoints["metrics_url"]]:
            scrape = hosts.run("c", PYTHON, "-c",
                               "import sys, urllib.request; "
                               "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10)"
                               ".read().decode())", url, stdout=subprocess.PIPE, text=True)
            page, _ = scrape.communicate(timeout=60)
            assert scrape.returncode == 0 and "kiln_" in page, url
        assert {n["metrics_url"] for n in nodes().values()} == {
            "http://10.231.1.2:9401/metrics", "http://10.231.2.2:9401/metrics"}

        cut_at = time.monotonic()
        hosts.cut("b")
        out = tmp_path / "requeued.png"
        w = hosts.kiln("wait", job_id, "--coordinator", client, "--out", str(out), "--json",
                       "--timeout", "240", "--no-progress")
        assert w.returncode == 0, w.stderr
        final = json.loads(w.stdout)
        print(f"requeued job finished {time.monotonic() - cut_at:.1f}s after the cut")
        assert final["state"] == "SUCCEEDED"
        assert final["node_id"] == "node-a" and final["attempts"] == 2
        assert out.read_bytes() == references(PROMPT, seed, steps)
        assert nodes()["node-b"]["state"] == "DEAD"

        # More jobs run on what is left (node-a, across the namespace boundary).
        r = hosts.kiln("generate", "--coordinator", client, "--prompt", PROMPT, "--steps", "1",
                       "--out", str(tmp_path / "after.png"), "--no-progress")
        assert r.returncode == 0, r.stderr
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
