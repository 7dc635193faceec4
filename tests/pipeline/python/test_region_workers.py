"""The regional layout's compile processes (kiln/region_workers.py, kiln.regional --worker): the
protocol's failure paths, on flux-tiny, CPU. Their success path is the regional fixture:
scripts/test.sh makes it with KILN_REGIONAL_JOBS=2 (two workers, two regions each), and
test_regional.py checks those packages against the whole-graph package and eager.

Run: KILN_TESTDATA=... PYTHONPATH=pipeline/python .venv/bin/python -m pytest -q \
         tests/pipeline/python/test_region_workers.py
"""
from __future__ import annotations

import dataclasses
import os
import time

import pytest

from kiln import artifact_key as ak
from kiln import region_workers as W
from kiln import regional as R

TESTDATA = os.environ.get("KILN_TESTDATA", "")
REPO = os.path.join(TESTDATA, "flux-tiny")

pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(REPO, "transformer",
                                                                "config.json")),
                                reason="needs KILN_TESTDATA with flux-tiny")


def _spec(**inductor_configs) -> dict:
    """A spec as kiln-compile makes it (its metadata names the key's digest)."""
    bucket = ak.Bucket(batch=1, height=64, width=64, text_len=16)
    inductor_configs["aot_inductor.metadata"] = {"kiln.digest": "0" * 64}
    return {"model": REPO, "precision": "fp32", "bucket": dataclasses.asdict(bucket),
            "options": dict(ak.default_compile_options(), layout="regional"), "device": "cpu",
            "inductor_configs": inductor_configs}


def test_unused_workers_end_at_once(monkeypatch):
    # A cache hit: kiln-compile started its workers and needs none of them; they are killed
    # while they still import torch, not waited for. Their Inductor compile pools share the CPUs
    # out (one pool worker per CPU in all), unless the operator says otherwise.
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
    workers = W.start_workers("cpu", 2)
    share = str(max(1, len(os.sched_getaffinity(0)) // 2))
    for p in workers:
        with open(f"/proc/{p.pid}/environ", "rb") as f:
            env = dict(e.split(b"=", 1) for e in f.read().split(b"\0") if b"=" in e)
        assert env[b"TORCHINDUCTOR_COMPILE_THREADS"] == share.encode()
    t0 = time.monotonic()
    W.stop_workers(workers)
    assert time.monotonic() - t0 < 5
    assert all(p.poll() is not None for p in workers)
    assert all(p.stdin.closed and p.stdout.closed and p.kiln_stderr.closed for p in workers)


def test_an_operators_compile_threads_win(monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "3")
    workers = W.start_workers("cpu", 2)
    try:
        for p in workers:
            with open(f"/proc/{p.pid}/environ", "rb") as f:
                assert b"TORCHINDUCTOR_COMPILE_THREADS=3\0" in f.read()
    finally:
        W.stop_workers(workers)


def test_a_failing_region_is_named_with_the_workers_error(tmp_path):
    # The parent builds the regions fine; the workers fail in Inductor (an unknown config), so
    # the error must come from them, with their stderr, for every region, and leave none running.
    workers = W.start_workers("cpu", 2)
    with pytest.raises(RuntimeError) as e:
        R.compile_regions(_spec(**{"no_such_inductor_option": True}), str(tmp_path),
                          workers=workers)
    msg = str(e.value)
    assert msg.startswith("regional compile failed: ")
    # one error per worker, naming its first region (head and double: regions 0 and 1)
    assert "region head (worker exit 1)" in msg and "region double (worker exit 1)" in msg
    assert "no_such_inductor_option" in msg
    assert all(p.poll() is not None for p in workers)
    assert not list(tmp_path.glob("*.pt2"))


def test_a_worker_that_dies_starting_is_reported(tmp_path):
    # A worker that cannot start (here: no such device) never reads its requests; the caller
    # says which regions it held and why, instead of a broken pipe.
    workers = W.start_workers("no-such-device", 2)
    with pytest.raises(RuntimeError) as e:
        R.compile_regions(_spec(), str(tmp_path), workers=workers)
    msg = str(e.value)
    assert "region head (worker exit" in msg and "region double (worker exit" in msg
    assert "region head (worker exit 2)" in msg
    assert "device 'no-such-device' is neither cpu nor cuda" in msg
