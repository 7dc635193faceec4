"""Observability of a real local cluster (a coordinator and two nodes on loopback, warm from the
shared cache):

* a real Prometheus (Debian's `prometheus`) on an ephemeral port, with the shipped scrape
  configuration (deploy/prometheus/prometheus.yml: the coordinator plus its HTTP service
  discovery) and alert rules, scrapes the cluster while it runs jobs; then every panel query of
  every generated Grafana dashboard (deploy/grafana/) is sent to Prometheus's HTTP API and must
  return data (GPU panels only where the cluster has a CUDA node: their queries must still be
  valid), and the committed dashboards must be what deploy/grafana/generate.py writes;
* `promtool check metrics` finds no problem on every process's /metrics page;
* the status page, loaded in headless Debian `chromium`, shows both nodes and a thumbnail of
  each finished job (checked in the rendered DOM and in /status/api); its screenshot is kept in
  build/test-artifacts/status_page.png;
* /healthz and /readyz of a node through its life (not registered yet, ready, draining with a job
  running) and of the coordinator (ready while serving; the job store going down is covered by
  tests/coordinator/status_board_test.cc, since the in-memory store cannot go down).
Needs prometheus, promtool and chromium (scripts/setup.sh installs them); skips without them."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import pytest

from cluster_support import (BIN, SOURCE, TESTDATA, MODEL, metric, requires_cluster,
                             start_cluster, stop_cluster, wait_until)

TOOLS = [t for t in ("prometheus", "promtool", "chromium") if shutil.which(t) is None]
pytestmark = [requires_cluster,
              pytest.mark.skipif(bool(TOOLS), reason=f"not installed: {', '.join(TOOLS)} "
                                 "(scripts/setup.sh installs them)")]

DEPLOY = os.path.join(SOURCE, "deploy")
ARTIFACTS = os.path.join(os.path.dirname(TESTDATA.rstrip("/")) if TESTDATA else tempfile.gettempdir(),
                         "test-artifacts")


def http(url: str, timeout: float = 10) -> tuple[int, str, bytes]:
    """(status, content type, body) of a GET; errors with a status are returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()
    except (urllib.error.URLError, ConnectionError) as e:  # not listening (yet, or any more)
        return 0, "", str(e).encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_url(metrics_url: str) -> str:
    return metrics_url.rsplit("/metrics", 1)[0]


def load_generator():
    spec = importlib.util.spec_from_file_location("kiln_grafana_generate",
                                                  os.path.join(DEPLOY, "grafana", "generate.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def submit_expiring_job(kiln_pb2, endpoint: str, cluster=None) -> str:
    """Submits a job with a deadline 1.5 s away while every node is drained: it fails with
    DEADLINE_EXCEEDED (a failure the dashboards' failure panels must show). (A job no registered
    node could run, such as fp8 on CPU nodes, is refused at submit and never counted as a
    failure.)"""
    import zmq
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if cluster is not None:
        cluster.apply_keys(sock)
    sock.connect(endpoint)
    try:
        env = kiln_pb2.Envelope(protocol_version=1, request_id="obs-expire")
        job_id = f"obs-expire-{uuid.uuid4().hex[:8]}"
        spec = env.submit.spec
        spec.job_id, spec.model, spec.prompt = job_id, "flux-tiny", "never runs"
        spec.width, spec.height, spec.steps = 256, 256, 1
        spec.deadline_unix_ms = int(time.time() * 1000) + 1500
        sock.send(env.SerializeToString())
        assert sock.poll(10000), "no reply to Submit"
        reply = kiln_pb2.Envelope()
        reply.ParseFromString(sock.recv())
        assert reply.WhichOneof("body") == "job" and reply.job.created, reply
        return job_id
    finally:
        sock.close()


@pytest.fixture(scope="module")
def observed(tmp_path_factory, kiln_pb2):
    """A two-node cluster scraped by a real Prometheus while it ran jobs (4 good, 1 failed)."""
    root = tmp_path_factory.mktemp("observability")
    cluster = start_cluster(str(root / "state"), nodes=2)
    prom = None
    try:
        coord = cluster.state()["coordinator"]
        coord_addr = base_url(coord["metrics_url"]).removeprefix("http://")
        # The shipped configuration, pointed at this cluster and scraping every second.
        config = open(os.path.join(DEPLOY, "prometheus", "prometheus.yml")).read()
        config = config.replace("kiln-coordinator:9400", coord_addr)
        config = re.sub(r"(scrape_interval|evaluation_interval|refresh_interval): 15s",
                        r"\1: 1s", config)
        config = config.replace("  - alerts.yml",
                                "  - " + os.path.join(DEPLOY, "prometheus", "alerts.yml"))
        assert coord_addr in config and "1s" in config
        (root / "prometheus.yml").write_text(config)
        port = free_port()
        log = open(root / "prometheus.log", "w")
        prom = subprocess.Popen(
            ["prometheus", f"--config.file={root / 'prometheus.yml'}",
             f"--storage.tsdb.path={root / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT)
        api = f"http://127.0.0.1:{port}"
        wait_until(lambda: http(f"{api}/-/ready", 2)[0] == 200 if prom.poll() is None else
                   pytest.fail(open(root / "prometheus.log").read()), 60, "Prometheus ready",
                   interval=0.5)

        def targets_up():
            body = json.loads(http(f"{api}/api/v1/targets")[2])
            active = body["data"]["activeTargets"]
            return [t for t in active if t["health"] == "up"] if len(active) == 3 and all(
                t["health"] == "up" for t in active) else None
        targets = wait_until(targets_up, 60, "the coordinator and both nodes scraped", 0.5)

        # Jobs while Prometheus watches: rates and histograms see them.
        results: dict = {}

        def generate(i: int) -> None:
            results[i] = cluster.kiln("generate", "--prompt", f"a lighthouse {i}", "--seed", str(i),
                                      "--steps", "2", "--out", str(root / f"job-{i}.png"),
                                      timeout=300)
        threads = [threading.Thread(target=generate, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, proc in results.items():
            assert proc.returncode == 0, f"job {i}: {proc.stderr}"
        assert len(results) == 4
        for node in ("node-1", "node-2"):
            cluster.kiln("drain", node, check=True)
        failed_job = submit_expiring_job(kiln_pb2, cluster.client_endpoint, cluster)
        wait_until(lambda: metric(cluster.metrics(), "kiln_job_failures_total",
                                  reason="DEADLINE_EXCEEDED") >= 1, 30, "the job expiring")
        for node in ("node-1", "node-2"):
            cluster.kiln("uncordon", node, check=True)
        time.sleep(4)  # a few more scrapes after the last job
        yield {"cluster": cluster, "api": api, "targets": targets, "root": root,
               "failed_job": failed_job}
    finally:
        if prom is not None:
            prom.terminate()
            try:
                prom.wait(30)
            except subprocess.TimeoutExpired:
                prom.kill()
        stop_cluster(cluster)


def query(api: str, expr: str) -> dict:
    status, _, body = http(f"{api}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    return {"http": status, **json.loads(body)}


def test_service_discovery_finds_every_node_with_its_labels(observed):
    cluster = observed["cluster"]
    nodes = cluster.state()["nodes"]
    coord = base_url(cluster.state()["coordinator"]["metrics_url"])
    status, ctype, body = http(f"{coord}/sd")
    assert status == 200 and ctype.startswith("application/json")
    groups = json.loads(body)
    want = {base_url(n["metrics_url"]).removeprefix("http://"): n["node_id"] for n in nodes}
    got = {g["targets"][0]: g["labels"]["node"] for g in groups}
    assert got == want
    assert all(g["labels"]["device_kind"] == "cpu" for g in groups)
    # Prometheus scraped them as kiln-nodes with the discovery labels.
    scraped = {t["labels"]["node"]: t["labels"]["job"] for t in observed["targets"]
               if "node" in t["labels"]}
    assert scraped == {n["node_id"]: "kiln-nodes" for n in nodes}


def test_every_dashboard_panel_query_returns_data(observed):
    api = observed["api"]
    generator = load_generator()
    has_gpu = observed["cluster"].state().get("device", "cpu").startswith("cuda")
    problems, skipped = [], []
    for name, dashboard in generator.DASHBOARDS.items():
        # The committed JSON is what the generator writes.
        committed = open(os.path.join(DEPLOY, "grafana", "dashboards", f"{name}.json")).read()
        assert committed == generator.text(dashboard), \
            f"deploy/grafana/dashboards/{name}.json is stale: run deploy/grafana/generate.py"
        for panel in dashboard.panels:
            for expr, _ in panel.queries:
                r = query(api, expr)
                where = f"dashboard {dashboard.title!r}, panel {panel.title!r}: {expr}"
                if r.get("status") != "success":
                    problems.append(f"{where}: {r.get('error')}")
                elif not r["data"]["result"]:
                    if panel.gpu and not has_gpu:
                        skipped.append(where)
                    else:
                        problems.append(f"{where}: no data")
    assert not problems, "\n".join(problems)
    if skipped:
        print("GPU panels without data on this CPU cluster (queries valid):\n" + "\n".join(skipped))


def test_alert_rules_load_and_stay_quiet_on_a_healthy_cluster(observed):
    body = json.loads(http(f"{observed['api']}/api/v1/rules")[2])
    rules = [r for g in body["data"]["groups"] for r in g["rules"]]
    assert len(rules) >= 9 and all(r["health"] == "ok" for r in rules), rules
    firing = [r["name"] for r in rules if r["state"] == "firing"]
    assert firing == []


def test_promtool_finds_no_problem_in_any_metrics_page(observed):
    cluster = observed["cluster"]
    pages = {"coordinator": cluster.metrics()}
    for n in cluster.state()["nodes"]:
        pages[n["node_id"]] = cluster.metrics(n["node_id"])
    for who, page in pages.items():
        assert "kiln_build_info{" in page, who
        proc = subprocess.run(["promtool", "check", "metrics"], input=page, text=True,
                              capture_output=True, timeout=60)
        assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), \
            f"{who}: {proc.stdout}{proc.stderr}"
    coord = pages["coordinator"]
    assert metric(coord, "kiln_job_latency_seconds_count", model="flux-tiny",
                  resolution="256") >= 4
    assert metric(coord, "kiln_job_queue_wait_seconds_count", priority="normal") >= 4
    assert metric(coord, "kiln_job_failures_total", reason="DEADLINE_EXCEEDED") == 1
    assert metric(coord, "kiln_node_busy", node="node-1") == 0


def test_status_page_in_a_headless_browser(observed):
    cluster = observed["cluster"]
    coord = base_url(cluster.state()["coordinator"]["metrics_url"])
    assert f"{coord}/status/" in cluster.up_output, cluster.up_output  # `kiln up` prints it
    status = json.loads(http(f"{coord}/status/api")[2])
    assert {n["node_id"] for n in status["nodes"]} == {"node-1", "node-2"}
    succeeded = [j for j in status["recent"] if j["state"] == "succeeded"]
    failed = [j for j in status["recent"] if j["state"] == "failed"]
    assert len(succeeded) >= 4 and [j["job_id"] for j in failed] == [observed["failed_job"]]
    for j in succeeded:
        code, ctype, png = http(coord + j["thumbnail"])
        assert code == 200 and ctype == "image/png" and png.startswith(b"\x89PNG"), j["job_id"]
        assert png == open(observed["root"] / f"job-{j['prompt'].split()[-1]}.png", "rb").read()

    profile = tempfile.mkdtemp(prefix="kiln-chromium-")
    os.makedirs(ARTIFACTS, exist_ok=True)
    shot = os.path.join(ARTIFACTS, "status_page.png")
    browser = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={profile}", "--virtual-time-budget=8000",
               "--window-size=1400,1000"]
    try:
        dom = subprocess.run(browser + ["--dump-dom", f"{coord}/status/"], capture_output=True,
                             text=True, timeout=180)
        assert dom.returncode == 0, dom.stderr
        html = dom.stdout
        assert 'data-loaded="1"' in html, html[-2000:]
        for node in ("node-1", "node-2"):
            assert f'data-node="{node}"' in html
        # Rendered rows only (the page's script holds the same markup as a template).
        thumbs = re.findall(r'<img class="thumb" alt="([^"$]+)" src="([^"$]+)"', html)
        assert {alt for alt, _ in thumbs} == {j["job_id"] for j in succeeded}, thumbs
        assert all(src == f"/status/jobs/{alt}.png" for alt, src in thumbs)
        if os.path.exists(shot):
            os.remove(shot)
        proc = subprocess.run(browser + [f"--screenshot={shot}", f"{coord}/status/"],
                              capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0 and os.path.getsize(shot) > 10000, proc.stderr
        print(f"status page screenshot: {shot}")
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def test_health_endpoints_through_a_nodes_and_the_coordinators_life(observed, tmp_path):
    cluster = observed["cluster"]
    coord = base_url(cluster.state()["coordinator"]["metrics_url"])
    assert http(f"{coord}/healthz")[:3:2] == (200, b"ok\n")
    assert http(f"{coord}/readyz")[0] == 200

    # A node that cannot reach its coordinator: alive, not ready.
    lonely = subprocess.Popen(
        [os.path.join(BIN, "kiln-node"), "--coordinator", f"tcp://127.0.0.1:{free_port()}",
         "--model", f"flux-tiny={MODEL}", "--package_dir", str(tmp_path / "pk"),
         "--node_id", "lonely", "--metrics", "127.0.0.1:0", "--insecure_plaintext"],
        stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in lonely.stderr:
            m = re.search(r"metrics (http://\S+/metrics)", line)
            if m:
                url = base_url(m.group(1))
                break
        assert url, "kiln-node did not print its metrics URL"
        assert http(f"{url}/healthz")[0] == 200
        status, _, body = http(f"{url}/readyz")
        assert status == 503 and b"not registered" in body
    finally:
        lonely.send_signal(signal.SIGKILL)
        lonely.wait(30)

    # A registered node is ready; draining (SIGTERM with a job running) it is not, while alive.
    node = cluster.node("node-2")
    url = base_url(node["metrics_url"])
    assert http(f"{url}/readyz")[0] == 200
    cluster.kiln("drain", "node-1", check=True)  # the long job goes to node-2
    job = threading.Thread(target=cluster.kiln, args=(
        "generate", "--prompt", "a long one", "--steps", "1000", "--out", str(tmp_path / "long.png")),
        kwargs={"timeout": 600})
    job.start()
    wait_until(lambda: metric(http(f"{url}/metrics")[2].decode(), "kiln_node_step_seconds_count")
               > 0 and json.loads(http(f"{coord}/status/api")[2])["running"], 120,
               "the long job running on node-2")
    os.kill(node["pid"], signal.SIGTERM)
    status, _, body = wait_until(lambda: (lambda r: r if r[0] == 503 else None)(
        http(f"{url}/readyz")), 10, "node-2 not ready while draining")
    assert b"draining" in body
    assert http(f"{url}/healthz")[0] == 200
    job.join()
