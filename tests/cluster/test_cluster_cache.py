"""The shared package cache across nodes: two fresh nodes cold-starting on the same key compile
it exactly once (single-flight under the cluster-wide lease), and a corrupt package in the shared
store is refused, quarantined and rebuilt. These compile (the first test every component of one
256x256 fp32 bucket, about a minute on two cores; the second one component)."""
from __future__ import annotations

import json
import os
import threading

from cluster_support import (metric, package_dirs, package_verifies, requires_cluster,
                             seed_shared_cache, start_cluster, stop_cluster)

pytestmark = requires_cluster

PROMPT = "a lighthouse on a cliff at dusk"
COMPONENTS = {"text_encoder", "text_encoder_2", "transformer", "vae_decoder"}


def _generate_concurrently(cluster, tmp_path, jobs):
    results = {}

    def run(job_id, seed):
        results[job_id] = cluster.kiln("generate", "--prompt", PROMPT, "--seed", str(seed),
                                       "--steps", "1", "--job-id", job_id, "--out",
                                       str(tmp_path / f"{job_id}.png"), "--json", "--timeout",
                                       "600", timeout=660)

    threads = [threading.Thread(target=run, args=j) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    infos = {}
    for job_id, _ in jobs:
        proc = results[job_id]
        assert proc.returncode == 0, f"{job_id}: {proc.stderr}"
        infos[job_id] = json.loads(proc.stdout)
    return infos


def test_two_fresh_nodes_compile_each_key_exactly_once(tmp_path, references):
    cluster = start_cluster(str(tmp_path / "state"), nodes=2, seed_cache=False)
    try:
        assert package_dirs(cluster.shared_cache) == []
        infos = _generate_concurrently(cluster, tmp_path, [("cold-a", 1), ("cold-b", 2)])
        assert {i["node_id"] for i in infos.values()} == {"node-1", "node-2"}, \
            "the two jobs should cold-start on different nodes"
        # Each key was compiled once in the whole cluster: the compile counts of both nodes add
        # up to the number of packages, and the shared cache holds one package per component.
        shared = package_dirs(cluster.shared_cache)
        assert len(shared) == len(COMPONENTS)
        components = {json.load(open(os.path.join(cluster.shared_cache, d, "manifest.json")))
                      ["key"]["component"] for d in shared}
        assert components == COMPONENTS
        assert all(package_verifies(os.path.join(cluster.shared_cache, d)) for d in shared)
        compiles = {n: metric(cluster.metrics(n), "kiln_artifact_compiles_total", result="ok")
                    for n in ("node-1", "node-2")}
        assert sum(compiles.values()) == len(COMPONENTS), compiles
        assert metric(cluster.metrics("node-1"), "kiln_artifact_compiles_total",
                      result="error") == 0
        # Whatever a node did not compile it took from the shared cache, after waiting for the
        # compiling node's lease where both wanted the same key at once.
        provenance = [p for i in infos.values() for p in i["packages"].values()]
        assert provenance.count("compiled") == len(COMPONENTS), infos
        assert set(provenance) <= {"compiled", "shared"}, infos
        # Same images as the single-process pipeline.
        for job_id, seed in (("cold-a", 1), ("cold-b", 2)):
            assert (tmp_path / f"{job_id}.png").read_bytes() == references(PROMPT, seed, 1)
    finally:
        stop_cluster(cluster)


def test_corrupt_package_in_the_shared_store_is_refused_and_rebuilt(tmp_path, references):
    state_dir = str(tmp_path / "state")
    shared = os.path.join(state_dir, "shared-cache")
    digests = seed_shared_cache(shared)
    # Corrupt the cheapest component to rebuild: flip bytes in the middle of its package.
    victim = next(d for d in digests
                  if json.load(open(os.path.join(shared, d, "manifest.json")))["key"]["component"]
                  == "text_encoder")
    pkg = os.path.join(shared, victim, "model.pt2")
    data = bytearray(open(pkg, "rb").read())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    open(pkg, "wb").write(bytes(data))
    assert not package_verifies(os.path.join(shared, victim))

    cluster = start_cluster(state_dir, nodes=1, seed_cache=False)
    try:
        proc = cluster.kiln("generate", "--prompt", PROMPT, "--seed", "3", "--steps", "1",
                            "--out", str(tmp_path / "x.png"), "--json", "--timeout", "600",
                            timeout=660)
        assert proc.returncode == 0, proc.stderr
        info = json.loads(proc.stdout)
        assert info["packages"]["text_encoder"] == "compiled", info
        assert {c: p for c, p in info["packages"].items() if c != "text_encoder"} == \
            {c: "shared" for c in COMPONENTS - {"text_encoder"}}, info
        assert (tmp_path / "x.png").read_bytes() == references(PROMPT, 3, 1)
        # The corrupt copy was moved aside and a good package published in its place.
        quarantine = os.path.join(shared, "quarantine")
        assert any(name.startswith(victim) for name in os.listdir(quarantine))
        assert package_verifies(os.path.join(shared, victim))
        page = cluster.metrics("node-1")
        assert metric(page, "kiln_artifact_requests_total", tier="shared", result="corrupt") >= 1
        assert metric(page, "kiln_artifact_compiles_total", result="ok") == 1
        # The node's local copy is good too.
        local = cluster.node("node-1")["package_dir"]
        assert package_verifies(os.path.join(local, victim))
    finally:
        stop_cluster(cluster)
