#!/usr/bin/env python3
"""A small kiln client in Python: submit a job, follow its progress, save the PNG.

It speaks kiln's wire protocol (common/proto/kiln.proto) with nothing but pyzmq and protobuf, so
it doubles as a template for clients in other languages:

  * connect a ZeroMQ DEALER socket to the coordinator's client endpoint;
  * send one frame holding a serialized kiln.v1.Envelope (protocol_version = 1, a request_id of
    your choice, and one request in the `body` oneof);
  * read frames back: each is an Envelope answering your request_id, holding the reply or an
    ErrorReply {code, field, message}. A Wait with stream_progress gets a JobReply per progress
    event and a last one with final = true.

Usage (with a local cluster from `kiln up`; the endpoint is in .kiln/cluster/cluster.json):

    python3 python_client.py --coordinator tcp://127.0.0.1:PORT \\
        --prompt "a red fox in fresh snow" --steps 8 --seed 42 --out fox.png

The protobuf module is generated on first use with `protoc` (Debian: protobuf-compiler) from the
.proto in this repository, or from --proto PATH. To generate it yourself:

    protoc -I common/proto --python_out=. common/proto/kiln.proto   # writes kiln_pb2.py

Exit status: 0 ok, 2 bad input (the coordinator's error names the field), 3 the job failed or
was cancelled, 1 anything else (e.g. no answer from the coordinator).
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from types import ModuleType
from typing import Callable, Iterator, Optional

import zmq

PROTOCOL_VERSION = 1
DEFAULT_PROTO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "common",
                             "proto", "kiln.proto")


def load_protocol(proto_path: str = DEFAULT_PROTO) -> ModuleType:
    """Imports kiln_pb2, generating it with protoc into a temporary directory if needed."""
    try:
        return importlib.import_module("kiln_pb2")
    except ImportError:
        pass
    proto_path = os.path.abspath(proto_path)
    out_dir = tempfile.mkdtemp(prefix="kiln_pb2_")
    subprocess.run(["protoc", f"-I{os.path.dirname(proto_path)}", f"--python_out={out_dir}",
                    proto_path], check=True)
    sys.path.insert(0, out_dir)
    return importlib.import_module("kiln_pb2")


class KilnError(Exception):
    """An ErrorReply from the coordinator: code ("INVALID_ARGUMENT", ...), field, message."""

    def __init__(self, code: str, field: str, message: str):
        # The coordinator's message often starts with the field already: say it once, as the
        # kiln CLI does ("INVALID_ARGUMENT (field spec.width): 300 is not a multiple of 16").
        shown = message.removeprefix(f"{field}: ") if field else message
        super().__init__(f"{code}" + (f" (field {field})" if field else "") + f": {shown}")
        self.code, self.field, self.message = code, field, message


def read_key_file(path: str) -> dict:
    """The `public-key = "..."` / `secret-key = "..."` lines of a NAME.key or NAME.pub file."""
    with open(path) as f:
        return dict(re.findall(r'(public-key|secret-key)\s*=\s*"([^"]{40})"', f.read()))


class KilnClient:
    """One coordinator connection. Every call gives up after request_timeout_s (plus the wait
    the request itself asks for) with TimeoutError instead of hanging."""

    def __init__(self, endpoint: str, pb: ModuleType, request_timeout_s: float = 10.0,
                 key_file: str | None = None, server_key_file: str | None = None):
        self.endpoint, self.pb, self.request_timeout_s = endpoint, pb, request_timeout_s
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if key_file and server_key_file:  # CURVE (docs/security.md): files from `kiln keys new`
            own, server = read_key_file(key_file), read_key_file(server_key_file)
            self.socket.curve_serverkey = server["public-key"].encode()
            self.socket.curve_publickey = own["public-key"].encode()
            self.socket.curve_secretkey = own["secret-key"].encode()
        self.socket.connect(endpoint)

    def close(self) -> None:
        self.socket.close()

    def _request(self, extra_s: float = 0.0, **body) -> Iterator:
        """Sends an Envelope with one body field; yields the replies to it until the caller
        stops. Raises KilnError for an ErrorReply, TimeoutError past the deadline."""
        env = self.pb.Envelope(protocol_version=PROTOCOL_VERSION, request_id=uuid.uuid4().hex,
                               **body)
        self.socket.send(env.SerializeToString())
        deadline = time.monotonic() + self.request_timeout_s + extra_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.socket.poll(int(left * 1000), zmq.POLLIN):
                raise TimeoutError(f"coordinator at {self.endpoint} did not answer within "
                                   f"{self.request_timeout_s + extra_s:.0f}s")
            reply = self.pb.Envelope()
            reply.ParseFromString(self.socket.recv())
            if reply.request_id != env.request_id and not (reply.HasField("error")
                                                           and not reply.request_id):
                continue  # a late answer to an earlier request
            if reply.HasField("error"):
                raise KilnError(reply.error.code, reply.error.field, reply.error.message)
            yield reply

    def submit(self, spec) -> "kiln.v1.JobReply":
        """Submits a JobSpec; reply.created is False if spec.job_id existed already."""
        reply = next(self._request(submit=self.pb.SubmitRequest(spec=spec)))
        return reply.job

    def wait(self, job_id: str, timeout_s: float, include_png: bool = True,
             on_progress: Optional[Callable] = None) -> "kiln.v1.JobInfo":
        """One Wait: returns the job when it is finished or after timeout_s (then unfinished)."""
        request = self.pb.WaitRequest(job_id=job_id, timeout_ms=int(timeout_s * 1000),
                                      include_png=include_png,
                                      stream_progress=on_progress is not None)
        for reply in self._request(extra_s=timeout_s, wait=request):
            if reply.job.final or on_progress is None:
                return reply.job.job
            on_progress(reply.job.job)
        raise AssertionError("unreachable")

    def generate(self, spec, on_progress: Optional[Callable] = None) -> "kiln.v1.JobInfo":
        """Submit, then wait (in 15 s slices, so a dead coordinator is noticed) until done."""
        self.submit(spec)
        finished = (self.pb.JOB_STATE_SUCCEEDED, self.pb.JOB_STATE_FAILED,
                    self.pb.JOB_STATE_CANCELLED)
        while True:
            job = self.wait(spec.job_id, 15.0, include_png=True, on_progress=on_progress)
            if job.state in finished:
                return job


def exit_code_for(error: KilnError) -> int:
    """The kiln CLI's policy (kiln::ExitCodeFor in common/status.h, for commands): 2 for bad
    input, an error that names a field or one of these codes; 1 for anything else."""
    bad_input = ("INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "OUT_OF_RANGE")
    return 2 if error.field or error.code in bad_input else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coordinator", default=os.environ.get("KILN_COORDINATOR"),
                        help="client endpoint, e.g. tcp://127.0.0.1:5555 (or $KILN_COORDINATOR)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--model", default="flux-tiny")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=0.0, help="0: the model's default")
    parser.add_argument("--lora", action="append", default=[], metavar="NAME[:SCALE]",
                        help="LoRA merged for this job (repeatable, in order; scale default 1)")
    parser.add_argument("--job-id", default=None, help="idempotency key (default: random)")
    parser.add_argument("--out", required=True, help="where to write the PNG")
    parser.add_argument("--proto", default=DEFAULT_PROTO, help="path of kiln.proto")
    parser.add_argument("--request-timeout", type=float, default=10.0, help="seconds")
    parser.add_argument("--key", default=os.environ.get("KILN_KEY"),
                        help="this client's CURVE key pair, NAME.key (or $KILN_KEY)")
    parser.add_argument("--server-key", default=os.environ.get("KILN_SERVER_KEY"),
                        help="the coordinator's public key, coordinator.pub (or $KILN_SERVER_KEY)")
    args = parser.parse_args()
    if not args.coordinator:
        parser.error("--coordinator (or $KILN_COORDINATOR) is required")

    pb = load_protocol(args.proto)
    spec = pb.JobSpec(job_id=args.job_id or f"py-{uuid.uuid4().hex[:12]}", model=args.model,
                      prompt=args.prompt, width=args.width, height=args.height,
                      steps=args.steps, seed=args.seed, guidance=args.guidance)
    for text in args.lora:
        name, _, scale = text.partition(":")
        spec.loras.add(name=name, scale=float(scale) if scale else 1.0)
    client = KilnClient(args.coordinator, pb, args.request_timeout, args.key, args.server_key)

    def show(job) -> None:
        state = pb.JobState.Name(job.state).removeprefix("JOB_STATE_")
        print(f"\r{spec.job_id}: {state} {job.node_id} {job.step}/{job.total_steps} steps",
              end="", file=sys.stderr, flush=True)

    try:
        job = client.generate(spec, on_progress=show)
    except KilnError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return exit_code_for(e)
    except TimeoutError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 1
    finally:
        client.close()
    show(job)
    print(file=sys.stderr)
    if job.state != pb.JOB_STATE_SUCCEEDED:
        print(f"error: job {spec.job_id} {pb.JobState.Name(job.state)}: {job.error}",
              file=sys.stderr)
        return 3
    tmp = f"{args.out}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(job.png)
    os.replace(tmp, args.out)  # atomic: readers never see half an image
    cold = job.cold_start
    print(f"{spec.job_id} ran on {job.node_id} in {job.run_seconds:.2f}s "
          f"(cold start {cold.total_seconds:.2f}s, compile {cold.compile_seconds:.2f}s); "
          f"packages: {dict(sorted(job.packages.items()))}", file=sys.stderr)
    print(os.path.abspath(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
