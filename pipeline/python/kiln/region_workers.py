"""The processes that compile the regional layout's regions (kiln/regional.py), started before
anything imports torch: kiln-compile starts them first thing, so that their start-up overlaps its
own. Torch-free on purpose (importing kiln.regional imports torch)."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

REGION_COUNT = 4  # kiln.regional.REGIONS: head, double, single, tail


def start_workers(device: str, count: int) -> list:
    """Region compile processes started ahead of their work (`python -m kiln.regional --worker
    DEVICE`): each imports torch, torch.export and Inductor, initializes CUDA for a CUDA target,
    starts Inductor's compile-worker pool, and then waits for requests on stdin, one region a
    line (compile_regions sends them and closes it). kiln-compile starts them first thing, so that their
    start-up (on the GPU hosts ~8 s a process, four at once) overlaps its own (importing torch,
    the artifact key) instead of following it. stderr goes to a temporary file (a pipe nobody
    reads until the end could fill and stall a worker); stop_workers ends them all."""
    workers = []
    try:
        for _ in range(count):
            err = tempfile.TemporaryFile(mode="w+")
            try:
                proc = subprocess.Popen([sys.executable, "-m", "kiln.regional", "--worker", device],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=err, text=True)
            except BaseException:
                err.close()
                raise
            proc.kiln_stderr = err
            workers.append(proc)
    except BaseException:
        stop_workers(workers)
        raise
    return workers


def stop_workers(workers: list) -> None:
    """Ends the workers: one still running (never given work, e.g. on a cache hit, or still
    compiling when another region failed) is killed at once. Closes their files."""
    for proc in workers:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for f in (proc.stdin, proc.stdout, proc.kiln_stderr):
            if f is not None and not f.closed:
                try:
                    f.close()
                except OSError:  # a broken pipe to a worker that died
                    pass


def regional_jobs() -> int:
    """How many region processes compile at once (regions are shared out among them):
    KILN_REGIONAL_JOBS, else one per region (4) where there are at least 16 CPUs (the GPU hosts),
    fewer on smaller machines (one per 4 CPUs), and none on fewer than 8 (1: the regions compile
    one after the other in the calling process; four torch processes on 2 cores only contend)."""
    return int(os.environ.get("KILN_REGIONAL_JOBS",
                              min(REGION_COUNT, max(1, (os.cpu_count() or 1) // 4))))
