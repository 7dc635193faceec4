"""Shared helpers for the cluster tests: real kiln-coordinator and kiln-node processes on loopback
(ephemeral ports), started and stopped with the `kiln` CLI in temporary state directories.

Needs the binaries in $KILN_BIN (kiln, kiln-coordinator, kiln-node, kiln-run) and the fixtures
scripts/test.sh makes in $KILN_TESTDATA (flux-tiny/, packages/ for 256x256 fp32 cpu); skips with
the reason otherwise."""
from __future__ import annotations

import hashlib
import importlib
import json
import re
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Optional

import pytest

BIN = os.environ.get("KILN_BIN", "")
TESTDATA = os.environ.get("KILN_TESTDATA", "")
SOURCE = os.environ.get("KILN_SOURCE") or os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", ".."))
MODEL = os.path.join(TESTDATA, "flux-tiny")
PACKAGES = os.path.join(TESTDATA, "packages")
PYTHON = os.environ.get("KILN_PYTHON") or sys.executable


def _missing() -> Optional[str]:
    if not BIN:
        return "KILN_BIN is not set (run through scripts/test.sh)"
    for exe in ("kiln", "kiln-coordinator", "kiln-node", "kiln-run"):
        if not os.access(os.path.join(BIN, exe), os.X_OK):
            return f"{exe} is not built in {BIN}"
    if not (TESTDATA and os.path.isdir(PACKAGES) and os.path.isdir(MODEL)):
        return "needs the flux-tiny fixtures made by scripts/test.sh ($KILN_TESTDATA)"
    if shutil.which("protoc") is None:
        return "protoc is not installed (Debian: protobuf-compiler)"
    return None


MISSING = _missing()
requires_cluster = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


def kiln(*args: str, timeout: float = 300, check: bool = False,
         env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Runs the kiln CLI; text output."""
    proc = subprocess.run([os.path.join(BIN, "kiln"), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    if check:
        assert proc.returncode == 0, f"kiln {' '.join(args)} -> {proc.returncode}\n{proc.stderr}"
    return proc


def pid_alive(pid: int) -> bool:
    """True for a live (non-zombie) process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False


def processes_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line contains `text` (e.g. a state directory)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and pid_alive(int(entry)):
            pids.append(int(entry))
    return pids


def package_dirs(root: str) -> list[str]:
    """Digests of the published packages under a package directory."""
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root)
                  if len(d) == 64 and os.path.isfile(os.path.join(root, d, "manifest.json")))


def package_verifies(pkg_dir: str) -> bool:
    """The package file matches the SHA-256 its manifest records."""
    manifest = json.load(open(os.path.join(pkg_dir, "manifest.json")))
    pkg = manifest["package"]
    data = open(os.path.join(pkg_dir, pkg.get("file", "model.pt2")), "rb").read()
    return hashlib.sha256(data).hexdigest() == pkg["sha256"]


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` in a Prometheus text page."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric_name = head.split("{", 1)[0]
        if metric_name != name:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def cluster_state_dir_of(package_dir: str) -> Optional[str]:
    """The `kiln up` state directory a package directory belongs to (STATE/shared-cache or
    STATE/nodes/<id>/packages), or None."""
    path = os.path.abspath(package_dir)
    if os.path.basename(path) == "shared-cache":
        return os.path.dirname(path)
    parts = path.split(os.sep)
    if len(parts) >= 4 and parts[-1] == "packages" and parts[-3] == "nodes":
        return os.sep.join(parts[:-3])
    return None


def sign_with_cluster_key(state_dir: str, package_dirs_: list[str]) -> None:
    """Signs package directories with the cluster's signing key (made now if `kiln up` has not
    made it yet): `kiln up` nodes load only packages the cluster signed."""
    key = os.path.join(state_dir, "keys", "package-signing.key")
    if not os.path.exists(key):
        os.makedirs(os.path.dirname(key), exist_ok=True)
        proc = kiln("signing-key", "new", key, timeout=60)
        assert proc.returncode == 0, proc.stderr
    for d in package_dirs_:
        proc = kiln("signing-key", "sign", key, d, timeout=60)
        assert proc.returncode == 0, proc.stderr


def seed_shared_cache(shared: str, source: str = PACKAGES) -> list[str]:
    """Copies the fixture packages (`source`: packages/, or packages-batch/ with the batch-2
    transformer and VAE too) into a shared cache (or a node's package directory) so nothing
    needs compiling; inside a `kiln up` state directory they are signed with the cluster's key."""
    os.makedirs(shared, exist_ok=True)
    digests = package_dirs(source)
    for d in digests:
        shutil.copytree(os.path.join(source, d), os.path.join(shared, d))
    state_dir = cluster_state_dir_of(shared)
    if state_dir is not None:
        sign_with_cluster_key(state_dir, [os.path.join(shared, d) for d in digests])
    return digests


@dataclass
class Cluster:
    """A local cluster made by `kiln up --detach` in `state_dir`."""
    state_dir: str
    up_output: str = ""
    extra_env: dict = field(default_factory=dict)

    def kiln(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return kiln(*args, "--state-dir", self.state_dir, **kw)

    def state(self) -> dict:
        return json.load(open(os.path.join(self.state_dir, "cluster.json")))

    @property
    def client_endpoint(self) -> str:
        return self.state()["coordinator"]["client_endpoint"]

    @property
    def shared_cache(self) -> str:
        return os.path.join(self.state_dir, "shared-cache")

    def node(self, node_id: str) -> dict:
        return next(n for n in self.state()["nodes"] if n["node_id"] == node_id)

    def metrics(self, node_id: Optional[str] = None) -> str:
        url = self.node(node_id)["metrics_url"] if node_id else \
            self.state()["coordinator"]["metrics_url"]
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.read().decode()

    def apply_keys(self, sock) -> None:
        """Makes a pyzmq socket a CURVE client with the cluster's admin key (kiln up makes the
        keys under STATE/keys); nothing for a plaintext cluster."""
        apply_admin_keys(sock, self.state_dir)

    def down(self) -> subprocess.CompletedProcess:
        return self.kiln("down", "--timeout", "30", timeout=120)


def read_key_file(path: str) -> dict:
    """{'public-key': ..., 'secret-key': ...} of a NAME.key / NAME.pub file (`kiln keys new`)."""
    keys = {}
    for line in open(path):
        m = re.match(r'\s*(public-key|secret-key)\s*=\s*"([^"]{40})"', line)
        if m:
            keys[m.group(1)] = m.group(2)
    return keys


def apply_admin_keys(sock, state_dir: str) -> None:
    """CURVE client options from a local cluster's STATE/keys (admin key, coordinator.pub)."""
    keys_dir = json.load(open(os.path.join(state_dir, "cluster.json"))).get("keys_dir", "")
    if not keys_dir:
        return
    admin = read_key_file(os.path.join(keys_dir, "admins", "admin.key"))
    server = read_key_file(os.path.join(keys_dir, "coordinator.pub"))
    sock.curve_serverkey = server["public-key"].encode()
    sock.curve_publickey = admin["public-key"].encode()
    sock.curve_secretkey = admin["secret-key"].encode()


def start_cluster(state_dir: str, nodes: int, *, seed_cache: bool = True,
                  extra: tuple = ()) -> Cluster:
    if seed_cache:
        seed_shared_cache(os.path.join(state_dir, "shared-cache"))
    proc = kiln("up", "--detach", "--nodes", str(nodes), "--models", f"flux-tiny={MODEL}",
                "--state-dir", state_dir, "--heartbeat-ms", "300", *extra, timeout=180)
    assert proc.returncode == 0, proc.stderr
    return Cluster(state_dir, proc.stdout)


def stop_cluster(cluster: Cluster) -> None:
    """`kiln down`; then make sure no process of the cluster is left, whatever happened."""
    cluster.down()
    try:
        state = cluster.state()
    except (OSError, ValueError):
        return
    for pid in [state["coordinator"].get("pid", 0)] + [n.get("pid", 0) for n in state["nodes"]]:
        if pid and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


_REFERENCES: dict = {}


def reference_png(prompt: str, seed: int, steps: int, tmp_root: str) -> bytes:
    """The image kiln-run makes for (prompt, seed, steps) at 256x256 from the fixture packages."""
    key = (prompt, seed, steps)
    if key not in _REFERENCES:
        out = os.path.join(tmp_root, f"ref-{len(_REFERENCES)}.png")
        proc = subprocess.run(
            [os.path.join(BIN, "kiln-run"), "--model", MODEL, "--package_dir", PACKAGES,
             "--nocompile", "--prompt", prompt, "--width", "256", "--height", "256",
             "--steps", str(steps), "--seed", str(seed), "--out", out],
            capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        _REFERENCES[key] = open(out, "rb").read()
    return _REFERENCES[key]


@pytest.fixture(scope="session")
def references(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("references"))
    return lambda prompt, seed, steps: reference_png(prompt, seed, steps, root)


@pytest.fixture(scope="session")
def kiln_pb2(tmp_path_factory):
    """The Python protobuf module of common/proto/kiln.proto, generated with protoc."""
    out = str(tmp_path_factory.mktemp("proto"))
    subprocess.run(["protoc", f"-I{os.path.join(SOURCE, 'common', 'proto')}",
                    f"--python_out={out}", os.path.join(SOURCE, "common", "proto", "kiln.proto")],
                   check=True)
    sys.path.insert(0, out)
    try:
        return importlib.import_module("kiln_pb2")
    finally:
        sys.path.remove(out)


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
