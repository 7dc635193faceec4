"""A `kiln up --no-compile` cluster whose packages are only in the shared cache: its node cannot
compile and holds nothing on local disk, but it fetches from the shared cache, so the coordinator
places the job there (NodeInfo.can_fetch) and the image comes back byte-identical to kiln-run's
(the fixture first.png: same prompt, seed, steps, fp32 on the cpu), fetched, not compiled.
Before can_fetch the job was never placed ("node-1 does not hold the packages ... and cannot
compile")."""
from __future__ import annotations

import json
import os

from cluster_support import (TESTDATA, metric, processes_mentioning, requires_cluster,
                             start_cluster, stop_cluster)

pytestmark = requires_cluster


def test_a_no_compile_cluster_fetches_from_the_shared_cache(tmp_path):
    state_dir = str(tmp_path / "state")
    cluster = start_cluster(state_dir, nodes=1, extra=("--no-compile",))
    try:
        nodes = json.loads(cluster.kiln("nodes", "--json", check=True).stdout)["nodes"]
        assert [(n["can_compile"], n["can_fetch"]) for n in nodes] == [(False, True)], nodes
        out = tmp_path / "out.png"
        proc = cluster.kiln("generate", "--prompt", "a lighthouse on a cliff at dusk", "--width",
                            "256", "--height", "256", "--steps", "4", "--seed", "7", "--out",
                            str(out), "--no-progress", "--json", "--timeout", "30", timeout=60)
        assert proc.returncode == 0, proc.stderr
        info = json.loads(proc.stdout)
        assert info["state"] == "SUCCEEDED" and info["node_id"] == "node-1", info
        assert set(info["packages"].values()) == {"shared"}, info["packages"]
        assert out.read_bytes() == open(os.path.join(TESTDATA, "first.png"), "rb").read()
        assert metric(cluster.metrics("node-1"), "kiln_artifact_compiles_total") == 0
    finally:
        stop_cluster(cluster)
    assert processes_mentioning(state_dir) == []
