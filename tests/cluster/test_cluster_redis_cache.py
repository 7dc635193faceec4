"""The Redis shared package tier (`redis://` as the shared cache) with real processes and a real
redis-server (ephemeral port, AOF on): two kiln-run processes with empty package directories
racing on one cold bucket compile each key once between them (single-flight under Redis compile
leases); a third, fresh one fetches every package from Redis and makes the same PNG; a blob
corrupted in Redis is refused, recorded and rebuilt by the next fresh process. Compiles every
component of one 256x256 fp32 bucket once (about a minute on two cores) and one again."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time

import pytest

from cluster_support import BIN, MODEL

KILN_RUN = os.path.join(BIN, "kiln-run") if BIN else ""
pytestmark = [
    pytest.mark.skipif(not (KILN_RUN and os.access(KILN_RUN, os.X_OK) and os.path.isdir(MODEL)),
                       reason="needs kiln-run and the flux-tiny fixture (scripts/test.sh)"),
    pytest.mark.skipif(shutil.which("redis-server") is None or shutil.which("redis-cli") is None,
                       reason="redis-server / redis-cli are not installed (Debian: redis-server)"),
]

COMPONENTS = {"text_encoder", "text_encoder_2", "transformer", "vae_decoder"}


@pytest.fixture
def redis_url(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = tmp_path / "redis"
    data.mkdir()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir",
                             str(data), "--appendonly", "yes", "--appendfsync", "always",
                             "--save", "", "--logfile", str(data / "redis.log")])
    deadline = time.monotonic() + 10
    while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True,
                         text=True).stdout.strip() != "PONG":
        assert time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0", port
    proc.kill()
    proc.wait()


def redis_raw(port: int, *args: str) -> bytes:
    return subprocess.run(["redis-cli", "-p", str(port), "--raw", *args], capture_output=True,
                          check=True).stdout


def kiln_run(tmp_path, name: str, url: str) -> dict:
    out = tmp_path / f"{name}.png"
    proc = subprocess.run(
        [KILN_RUN, "--model", MODEL, "--prompt", "a lighthouse on a cliff at dusk", "--width",
         "256", "--height", "256", "--steps", "1", "--seed", "7", "--out", str(out), "--json",
         "--package_dir", str(tmp_path / f"{name}-packages"), "--shared_dir", url],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{name}: {proc.stderr}"
    info = json.loads(proc.stdout)
    info["png_bytes"] = out.read_bytes()
    info["stderr"] = proc.stderr
    return info


def test_redis_shared_tier_compiles_once_fetches_and_rebuilds_corrupt_blobs(tmp_path, redis_url):
    url, port = redis_url
    results: dict[str, dict] = {}
    threads = [threading.Thread(target=lambda n=n: results.__setitem__(n, kiln_run(tmp_path, n,
                                                                                  url)))
               for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(results) == {"a", "b"}, "a kiln-run failed (see the assertion above)"
    provenance = [results[n]["packages"][c] for n in ("a", "b") for c in COMPONENTS]
    # Each key compiled exactly once in the "cluster"; the other process fetched it from Redis.
    assert provenance.count("compiled") == len(COMPONENTS), provenance
    assert provenance.count("shared") == len(COMPONENTS), provenance
    assert results["a"]["png_bytes"] == results["b"]["png_bytes"]
    digests = redis_raw(port, "SMEMBERS", "kiln:cache:index").decode().split()
    assert len(digests) == len(COMPONENTS), digests

    fresh = kiln_run(tmp_path, "fresh", url)
    assert set(fresh["packages"].values()) == {"shared"}, fresh["packages"]
    assert fresh["png_bytes"] == results["a"]["png_bytes"]

    # Corrupt one byte of the transformer's package in Redis.
    target = None
    for d in digests:
        upload = redis_raw(port, "HGET", f"kiln:cache:pkg:{d}", "upload").decode().strip()
        manifest = json.loads(redis_raw(port, "GET",
                                        f"kiln:cache:blob:{d}:{upload}:manifest.json:0"))
        if manifest["key"]["component"] == "transformer":
            target = (d, upload)
    assert target, "no transformer package in Redis"
    d, upload = target
    redis_raw(port, "SETRANGE", f"kiln:cache:blob:{d}:{upload}:model.pt2:0", "100", "XXXX")

    rebuilt = kiln_run(tmp_path, "rebuilt", url)
    assert rebuilt["packages"]["transformer"] == "compiled", rebuilt["packages"]
    assert {rebuilt["packages"][c] for c in COMPONENTS - {"transformer"}} == {"shared"}
    assert any("corrupt" in w for w in rebuilt["warnings"]), rebuilt["warnings"]
    assert d in redis_raw(port, "LRANGE", "kiln:cache:corrupt", "0", "-1").decode()
    assert rebuilt["png_bytes"] == results["a"]["png_bytes"]
    # Republished: the next fresh process fetches everything again.
    again = kiln_run(tmp_path, "again", url)
    assert set(again["packages"].values()) == {"shared"}, again["packages"]
