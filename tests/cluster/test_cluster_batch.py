"""Batching on a one-node cluster (`kiln up --max-batch 2 --batch-wait-ms 10000`; the shared cache
holds the fixture's batch-2 packages too, so nothing compiles): two jobs submitted together run
as one batch — the node's kiln_node_batch_size says so, and the coordinator's status of the node
gave it both — and each image is exactly its job's in the pipeline's own batch of the two
(the fixture's batch-0.png and batch-1.png: kiln-run --batch 2, seeds 7 and 8)."""
from __future__ import annotations

import json
import os

import pytest

from cluster_support import (TESTDATA, metric, processes_mentioning, requires_cluster,
                             seed_shared_cache, start_cluster, stop_cluster)

pytestmark = requires_cluster
BATCH_PACKAGES = os.path.join(TESTDATA, "packages-batch")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if not os.path.isdir(BATCH_PACKAGES):
        pytest.skip("needs the batch fixture made by scripts/test.sh")
    state_dir = str(tmp_path_factory.mktemp("batch") / "state")
    seed_shared_cache(os.path.join(state_dir, "shared-cache"), BATCH_PACKAGES)
    # The wait is long: the batch forms as soon as the second job is encoded.
    c = start_cluster(state_dir, nodes=1, seed_cache=False,
                      extra=("--max-batch", "2", "--batch-wait-ms", "10000"))
    yield c
    stop_cluster(c)
    assert processes_mentioning(state_dir) == []


def test_two_jobs_submitted_together_run_as_one_batch_with_their_own_images(cluster, tmp_path):
    nodes = json.loads(cluster.kiln("nodes", "--json", check=True).stdout)["nodes"]
    assert [n["node_id"] for n in nodes] == ["node-1"]
    for job_id, seed in (("b7", 7), ("b8", 8)):
        proc = cluster.kiln("submit", "--job-id", job_id, "--prompt",
                            "a lighthouse on a cliff at dusk", "--width", "256", "--height", "256",
                            "--steps", "4", "--seed", str(seed), "--precision", "fp32")
        assert proc.returncode == 0, proc.stderr
    for job_id, reference in (("b7", "batch-0.png"), ("b8", "batch-1.png")):
        out = tmp_path / f"{job_id}.png"
        proc = cluster.kiln("wait", job_id, "--timeout", "300", "--out", str(out), "--json",
                            timeout=400)
        assert proc.returncode == 0, proc.stderr
        info = json.loads(proc.stdout)
        assert info["state"] == "SUCCEEDED", info
        assert out.read_bytes() == open(os.path.join(TESTDATA, reference), "rb").read(), job_id
    page = cluster.metrics("node-1")
    assert metric(page, "kiln_node_batch_size_count", model="flux-tiny") == 1
    assert metric(page, "kiln_node_batch_size_sum", model="flux-tiny") == 2
    assert metric(page, "kiln_artifact_compiles_total") == 0  # the batch-2 packages were shared
