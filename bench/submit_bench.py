"""Submits/s and status/s through one kiln-coordinator on loopback, from several client processes.

    .venv/bin/python bench/submit_bench.py [--bin build/bin] [--clients 4] [--seconds 10]
        [--stores memory,always,everysec] [--window 1]

For each store it starts a kiln-coordinator (memory: in-memory store; always / everysec: a
redis-server started here on an ephemeral port with AOF and that appendfsync, and the coordinator
on --redis), registers one node for the model (it then falls silent: jobs stay queued, which is
what Submit costs), and runs `clients` processes, each a DEALER with `window` requests outstanding (default one):
Submit for `seconds`, then Status of the jobs it submitted for `seconds`. Prints requests/s and
p50/p99 latency (client send to reply) per store and phase. Needs protoc, pyzmq, protobuf.
"""
from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq

SOURCE = Path(__file__).resolve().parents[1]


def load_pb(out: Path):
    subprocess.run(["protoc", "-I", str(SOURCE / "common" / "proto"), f"--python_out={out}",
                    str(SOURCE / "common" / "proto" / "kiln.proto")], check=True)
    sys.path.insert(0, str(out))
    return importlib.import_module("kiln_pb2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(tmp: Path, fsync: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    d = tmp / f"redis-{fsync}"
    d.mkdir()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d),
         "--appendonly", "yes", "--appendfsync", fsync, "--save", "",
         "--logfile", str(d / "redis.log")])
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("redis-server did not start")
        time.sleep(0.05)


def start_coordinator(binary: Path, tmp: Path, name: str, extra: list[str]):
    endpoints = tmp / f"{name}.json"
    log = open(tmp / f"{name}.log", "wb")
    proc = subprocess.Popen(
        [str(binary), "--client_endpoint", "tcp://127.0.0.1:0", "--node_endpoint",
         "tcp://127.0.0.1:0", "--metrics", "127.0.0.1:0", "--endpoints_file", str(endpoints),
         "--log_format", "text", "--insecure_plaintext", *extra], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not endpoints.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError((tmp / f"{name}.log").read_text(errors="replace"))
        time.sleep(0.05)
    time.sleep(0.1)
    return proc, json.loads(endpoints.read_text())


def register_node(pb, endpoint: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, b"bench-node")
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    env = pb.Envelope(protocol_version=1)
    info = env.register_node.info
    info.node_id = "bench-node"
    info.device.kind = "cpu"
    info.models.append("flux-tiny")
    info.can_compile = True
    sock.send(env.SerializeToString())
    if not sock.poll(10000):
        raise RuntimeError("no RegisterAck")
    sock.recv_multipart()
    ctx.destroy(linger=0)


def client(pb_dir: str, endpoint: str, index: int, seconds: float, start_at: float, window: int,
           out) -> None:
    sys.path.insert(0, pb_dir)
    pb = importlib.import_module("kiln_pb2")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    while time.time() < start_at:
        time.sleep(0.001)
    result = {}
    ids: list[str] = []
    for phase in ("submit", "status"):
        lat: list[float] = []
        errors = 0
        end = time.perf_counter() + seconds
        n = 0
        sent: dict[str, tuple[float, str]] = {}  # request_id → (send time, job id)

        def send() -> None:
            nonlocal n
            env = pb.Envelope(protocol_version=1, request_id=str(n))
            job_id = ""
            if phase == "submit":
                job_id = f"c{index}-{n}"
                s = env.submit.spec
                s.job_id, s.model, s.prompt = job_id, "flux-tiny", "a lighthouse at dusk"
                s.width, s.height, s.steps, s.seed = 256, 256, 4, n
            else:
                env.status.job_id = ids[n % len(ids)]
            data = env.SerializeToString()
            sent[str(n)] = (time.perf_counter(), job_id)
            sock.send(data)
            n += 1

        # `window` requests outstanding: each reply sends the next until time is up.
        for _ in range(window):
            send()
        while sent:
            reply = pb.Envelope()
            reply.ParseFromString(sock.recv_multipart()[-1])
            t0, job_id = sent.pop(reply.request_id)
            lat.append(time.perf_counter() - t0)
            if reply.WhichOneof("body") != "job":
                errors += 1
            elif phase == "submit":
                ids.append(job_id)
            if time.perf_counter() < end:
                send()
        result[phase] = {"latencies": lat, "errors": errors}
    out.put(result)
    ctx.destroy(linger=0)


def fsync_ms(directory: Path, n: int = 50) -> tuple[float, float]:
    """p50 and p99 ms of a 100-byte append + fsync in `directory`: what one AOF fsync costs on
    this disk now (with `appendfsync always` every write waits for one)."""
    lat = []
    with open(directory / "fsync-probe", "ab") as f:
        for _ in range(n):
            t0 = time.perf_counter()
            f.write(b"x" * 100)
            f.flush()
            os.fsync(f.fileno())
            lat.append(time.perf_counter() - t0)
    os.unlink(directory / "fsync-probe")
    return 1000 * percentile(lat, 0.5), 1000 * percentile(lat, 0.99)


def percentile(v: list[float], p: float) -> float:
    v = sorted(v)
    return v[min(len(v) - 1, int(p * (len(v) - 1) + 0.5))] if v else 0.0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=str(SOURCE / "build" / "bin"))
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--stores", default="memory,always,everysec")
    ap.add_argument("--window", type=int, default=1,
                    help="requests each client keeps outstanding (pipelined on its DEALER)")
    args = ap.parse_args()
    binary = Path(args.bin) / "kiln-coordinator"
    with tempfile.TemporaryDirectory() as tmpname:
        tmp = Path(tmpname)
        pb_dir = tmp / "proto"
        pb_dir.mkdir()
        pb = load_pb(pb_dir)
        print(f"{'store':<18} {'phase':<7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'errors':>7}  ({args.clients} client processes x {args.window} outstanding, "
              f"{args.seconds:.0f} s each)")
        for store in args.stores.split(","):
            redis = None
            extra: list[str] = []
            if store != "memory":
                if shutil.which("redis-server") is None:
                    print(f"{store}: redis-server is not installed")
                    continue
                redis, url = start_redis(tmp, store)
                extra = ["--redis", url]
                p50, p99 = fsync_ms(tmp)
                print(f"# fsync of 100 bytes in {tmp} before this run: p50 {p50:.2f} ms, "
                      f"p99 {p99:.2f} ms", flush=True)
            coord, info = start_coordinator(binary, tmp, f"coordinator-{store}", extra)
            try:
                register_node(pb, info["node_endpoint"])
                q = mp.Queue()
                start_at = time.time() + 1.0
                procs = [mp.Process(target=client, args=(str(pb_dir), info["client_endpoint"], i,
                                                         args.seconds, start_at, args.window, q))
                         for i in range(args.clients)]
                for p in procs:
                    p.start()
                results = [q.get(timeout=4 * args.seconds + 60) for _ in procs]
                for p in procs:
                    p.join()
                for phase in ("submit", "status"):
                    lat = [x for r in results for x in r[phase]["latencies"]]
                    errors = sum(r[phase]["errors"] for r in results)
                    label = "memory" if store == "memory" else f"redis {store}"
                    print(f"{label:<18} {phase:<7} {len(lat) / args.seconds:8.0f} "
                          f"{1000 * percentile(lat, 0.5):8.2f} {1000 * percentile(lat, 0.99):8.2f} "
                          f"{errors:7d}", flush=True)
            finally:
                coord.terminate()
                coord.wait(timeout=20)
                if redis is not None:
                    redis.terminate()
                    redis.wait(timeout=20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
