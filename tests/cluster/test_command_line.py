"""Every kiln executable's command line (issue 11, the first hour): --help and --version answer
with status 0, flag names take '-' and '_' alike, bad flags exit 2. Real binaries from $KILN_BIN;
no fixtures needed."""
import os
import signal
import subprocess
import tempfile
import time

import pytest

BIN = os.environ.get("KILN_BIN", "")
PROGRAMS = ["kiln", "kiln-coordinator", "kiln-node", "kiln-run", "kiln-canary", "kiln-bench"]

pytestmark = pytest.mark.skipif(not BIN, reason="KILN_BIN is not set (run through scripts/test.sh)")


def run(program: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    path = os.path.join(BIN, program)
    if not os.access(path, os.X_OK):
        if program == "kiln-bench":
            pytest.skip("kiln-bench is built only against a CUDA LibTorch")
        pytest.fail(f"{program} is not built in {BIN}")
    return subprocess.run([path, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("program", PROGRAMS)
def test_help_lists_flags_and_exits_0(program):
    proc = run(program, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage" in proc.stdout.lower()
    assert "No flags matched" not in proc.stdout + proc.stderr
    if program == "kiln-coordinator":
        assert "--log-format" in proc.stdout  # flags defined in common/ are listed too
    expected = {"kiln": "generate", "kiln-coordinator": "--heartbeat-ms",
                "kiln-node": "--coordinator", "kiln-run": "--prompt", "kiln-canary": "--manifest",
                "kiln-bench": "--inputs"}
    assert expected[program] in proc.stdout


@pytest.mark.parametrize("program", PROGRAMS)
def test_version_names_commit_torch_cuda(program):
    proc = run(program, "--version")
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.splitlines()[:2]
    assert first.startswith(program + " ") and "(git " in first, proc.stdout
    assert second.startswith("torch ") and ", CUDA " in second, proc.stdout
    assert "unknown" not in first  # the commit was baked in at configure time


@pytest.mark.parametrize("program", PROGRAMS)
def test_unknown_flag_exits_2_naming_it(program):
    proc = run(program, *(["nodes"] if program == "kiln" else []), "--no-such-flag=1")
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "no" in proc.stderr and "such" in proc.stderr


def test_bad_value_exits_2():
    proc = run("kiln-coordinator", "--heartbeat-ms=often")
    assert proc.returncode == 2, proc.stderr
    assert "--heartbeat_ms" in proc.stderr and "often" in proc.stderr


@pytest.mark.parametrize("style", ["-", "_"])
def test_coordinator_runs_with_either_flag_style(style):
    def flag(name: str) -> str:
        return "--" + name.replace("_", style)

    with tempfile.TemporaryDirectory() as tmp:
        endpoints = os.path.join(tmp, "endpoints.json")
        proc = subprocess.Popen(
            [os.path.join(BIN, "kiln-coordinator"), flag("client_endpoint"), "tcp://127.0.0.1:0",
             flag("node_endpoint"), "tcp://127.0.0.1:0", flag("metrics"), "127.0.0.1:0",
             flag("endpoints_file"), endpoints, flag("heartbeat_ms"), "200",
             flag("insecure_plaintext")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.time() + 30
            while not os.path.exists(endpoints) and proc.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            assert os.path.exists(endpoints), proc.stderr.read() if proc.poll() is not None else ""
        finally:
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err


def test_run_reads_dashed_flags():
    # A missing model is bad input (2), after --package-dir was accepted as a flag.
    proc = run("kiln-run", "--model", "/nonexistent/flux", "--prompt", "a cat", "--out",
               "/tmp/never.png", "--package-dir", "/tmp/never-packages", "--max-sequence-length",
               "32")
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "unknown flag" not in proc.stderr
    assert "model directory /nonexistent/flux does not exist" in proc.stderr


def test_up_reports_a_missing_model_directory_as_missing(tmp_path):
    proc = run("kiln", "up", "--detach", "--models", "flux-tiny=/nonexistent/flux", "--state-dir",
               str(tmp_path / "state"))
    assert proc.returncode == 2, proc.stderr
    assert "/nonexistent/flux (model flux-tiny) does not exist" in proc.stderr
    assert "not a diffusers model repository" not in proc.stderr
