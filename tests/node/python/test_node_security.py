"""kiln-node and the parts of issue 12 a single node shows, against the fake coordinator of
test_kiln_node_process.py:

* a node runs as an unprivileged user (nobody): registers, runs a job byte-identical to the
  fixture, writes only its own directories (skipped with the reason when not root);
* a full package directory: the job fails with RESOURCE_EXHAUSTED and one line naming the node,
  the directory and the remedy (no traceback), the heartbeat before the result says the node
  takes no jobs, /readyz says why, and the next job is refused at once with the same code (the
  coordinator requeues both elsewhere). The directory is a tmpfs the test mounts (skipped with the
  reason where it cannot mount).
"""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

import pytest

from test_kiln_node_process import (MODEL, NODE, PACKAGES, TESTDATA, FakeCoordinator, _missing,
                                    pb)  # noqa: F401 - pb is a fixture

pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


@pytest.fixture
def coordinator(pb):  # noqa: F811 - the fixture above
    c = FakeCoordinator(pb)
    yield c
    c.close()


def start_node(workdir: str, endpoint: str, *extra: str, user: str = "", node_id: str = "node-a"):
    log = open(os.path.join(workdir, f"{node_id}.log"), "wb")
    argv = [NODE, f"--coordinator={endpoint}", f"--node_id={node_id}",
            f"--model=flux-tiny={MODEL}", "--resolutions=256x256", "--metrics=127.0.0.1:0",
            "--heartbeat_ms=200", "--no_compile", "--insecure_plaintext",
            f"--status_file={os.path.join(workdir, node_id + '.json')}", *extra]
    if user:
        argv = ["runuser", "-u", user, "--", *argv]
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT), log


def status(workdir: str, node_id: str = "node-a", timeout: float = 30) -> dict:
    import json
    path = os.path.join(workdir, node_id + ".json")
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, "no status file"
        time.sleep(0.05)
    return json.load(open(path))


def stop(proc) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_node_runs_as_an_unprivileged_user(coordinator):
    if os.geteuid() != 0:
        pytest.skip("needs root to start kiln-node as another user (runuser)")
    if shutil.which("runuser") is None:
        pytest.skip("runuser is not installed")
    nobody = pwd.getpwnam("nobody")
    for path in (NODE, os.path.join(MODEL, "model_index.json")):
        probe = subprocess.run(["runuser", "-u", "nobody", "--", "test", "-r", path])
        if probe.returncode != 0:
            pytest.skip(f"{path} is not readable by nobody (its parent directories are private)")
    workdir = tempfile.mkdtemp(prefix="kiln-nobody-")
    try:
        os.chmod(workdir, 0o755)
        packages = os.path.join(workdir, "packages")
        shutil.copytree(PACKAGES, packages)
        for root, dirs, files in os.walk(workdir):
            for name in dirs + files:
                os.chown(os.path.join(root, name), nobody.pw_uid, nobody.pw_gid)
        os.chown(workdir, nobody.pw_uid, nobody.pw_gid)
        proc, log = start_node(workdir, coordinator.endpoint, f"--package_dir={packages}",
                               user="nobody")
        try:
            ident, info = coordinator.register()
            pid = status(workdir)["pid"]
            uid = next(line.split()[1] for line in open(f"/proc/{pid}/status")
                       if line.startswith("Uid:"))
            assert int(uid) == nobody.pw_uid
            coordinator.assign(ident, "job-nobody", guidance=0.0)
            _, result = coordinator.expect("result", job_id="job-nobody")
            assert result.result.ok, result.result.error
            assert result.result.png == open(os.path.join(TESTDATA, "first.png"), "rb").read()
        finally:
            stop(proc)
            log.close()
        # Everything the node wrote is in its own directory and owned by it.
        for root, dirs, files in os.walk(packages):
            for name in dirs + files:
                assert os.lstat(os.path.join(root, name)).st_uid == nobody.pw_uid, name
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def readyz(metrics_url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(metrics_url.replace("/metrics", "/readyz"), timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_full_package_dir_fails_the_job_in_one_clear_line_and_the_node_takes_no_more(
        coordinator, tmp_path):
    packages = str(tmp_path / "packages")
    os.makedirs(packages)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "kiln-test", packages],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    shared = str(tmp_path / "shared")
    shutil.copytree(PACKAGES, shared)
    proc = None
    log = None
    try:
        # A long probe interval: the node starts healthy and only learns of the full disk when a
        # job fails on it.
        proc, log = start_node(str(tmp_path), coordinator.endpoint, f"--package_dir={packages}",
                               f"--shared_cache={shared}", "--disk_check_ms=600000")
        ident, _ = coordinator.register()
        with open(os.path.join(packages, "filler"), "wb") as f:
            try:
                while True:
                    f.write(b"x" * 65536)
                    f.flush()
            except OSError:
                pass
        coordinator.assign(ident, "job-full")
        seen = []
        _, result = coordinator.expect("result", job_id="job-full", seen=seen)
        r = result.result
        assert not r.ok
        assert r.error_code == "RESOURCE_EXHAUSTED", (r.error_code, r.error)
        assert "\n" not in r.error and "Traceback" not in r.error
        assert "node node-a" in r.error and packages in r.error
        assert "No space left on device" in r.error and "free space" in r.error
        assert "moves to another node" in r.error
        # The heartbeat that went out before the result already said so.
        beats = [e.heartbeat for e in seen if e is not None and e.WhichOneof("body") == "heartbeat"]
        assert beats and "No space left on device" in beats[-1].unhealthy
        code, body = readyz(status(str(tmp_path))["metrics_url"])
        assert code == 503 and "No space left on device" in body
        # The next job is refused at once, with the same code.
        coordinator.assign(ident, "job-next")
        _, result = coordinator.expect("result", job_id="job-next", timeout=10)
        assert not result.result.ok and result.result.error_code == "RESOURCE_EXHAUSTED"
    finally:
        if proc is not None:
            stop(proc)
        if log is not None:
            log.close()
        subprocess.run(["umount", "-l", packages], capture_output=True)
