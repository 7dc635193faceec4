"""kiln-compile on a package directory it cannot write (issue 12, "failures that move jobs"):
a read-only directory exits 4 and a full one 3, each with a last stderr line that says what and
where (cache/compiler.cc turns them into UNAVAILABLE / RESOURCE_EXHAUSTED with that line; the
traceback above it goes to the node's log). The directory is a tmpfs the test mounts (skipped,
with the reason, where it cannot mount)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

TESTDATA = os.environ.get("KILN_TESTDATA", "")
MODEL = os.path.join(TESTDATA, "flux-tiny")
pytestmark = pytest.mark.skipif(not os.path.isdir(MODEL),
                                reason="needs the flux-tiny fixture made by scripts/test.sh")


def compile_into(out_root: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [os.environ.get("KILN_PYTHON", sys.executable), "-m", "kiln.compile", "--model", MODEL,
         "--component", "text_encoder", "--precision", "fp32", "--target", "cpu",
         "--out-root", out_root], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("options,exit_code,words", [
    ("ro,size=1m", 4, "Read-only file system"),
    ("size=64k", 3, "No space left on device"),
])
def test_unwritable_package_dir_is_one_clear_line_and_its_own_exit_status(
        tmp_path, options, exit_code, words):
    root = str(tmp_path / "packages")
    os.makedirs(root)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "kiln-test", root],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        proc = compile_into(root)
    finally:
        subprocess.run(["umount", "-l", root], capture_output=True)
    assert proc.returncode == exit_code, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"kiln-compile: cannot write packages to {root}: {words}"), last
