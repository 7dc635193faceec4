"""A sequence-parallel flux-tiny DoubleStreamBlock, compiled by AOTInductor with its all-to-alls
inside (bench/aoti_collectives.py: 2 gloo ranks, one package each), run from C++ as 2 processes
(kiln-sp-a2a-run, bench/sp/aoti_all_to_all_run.cc) through the group parallel::ProcessGroup
makes and registers under the package's group name "0". Each rank's output must equal its token
shard of the single-process block within 3e-6 of max|out| (docs/multi_gpu.md's tolerance for
fp32 on the CPU), and a run before the group exists must be refused naming the group.

The packages are only compiled in Python (--compile-only): a package with collectives run from
Python can deadlock on the GIL (docs/multi_gpu.md); the C++ run has no GIL, which is the point.

Needs $KILN_BIN/kiln-sp-a2a-run; about a minute (two package compiles at once).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

BIN = os.environ.get("KILN_BIN", "")
SOURCE = os.environ.get("KILN_SOURCE") or os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", "..", ".."))
TOOL = os.path.join(BIN, "kiln-sp-a2a-run")
TOLERANCE = 3e-6


@pytest.mark.skipif(not os.path.exists(TOOL), reason="needs $KILN_BIN/kiln-sp-a2a-run")
def test_sp_block_package_runs_from_cpp_over_two_ranks(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.path.join(SOURCE, "pipeline", "python"))
    made = subprocess.run([sys.executable, os.path.join(SOURCE, "bench", "aoti_collectives.py"),
                           "--world", "2", "--out", str(tmp_path), "--compile-only"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    for rank in (0, 1):
        assert (tmp_path / f"block-rank{rank}.pt2").exists(), made.stdout[-3000:]
    port_file = tmp_path / "port"
    ranks = [subprocess.Popen([TOOL, str(tmp_path), "--world", "2", "--rank", str(rank),
                               "--port_file", str(port_file), "--package", "block-rank{rank}.pt2",
                               "--tolerance", str(TOLERANCE)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    for rank, p in enumerate(ranks):
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, out + err[-3000:]
        assert (f"[rank {rank}] without a registered group: refused: Could not resolve the "
                f"process group registered under the name 0") in out
        m = re.search(rf"\[rank {rank}\] group '0' of 2 ranks \(gloo\) registered: ran "
                      rf"block-rank{rank}\.pt2; max\|out - want\| / max\|want\| = (\S+)", out)
        assert m, out
        assert float(m.group(1)) <= TOLERANCE
