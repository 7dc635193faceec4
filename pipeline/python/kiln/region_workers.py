"""The processes that compile the regional layout's regions (kiln/regional.py), started before
anything imports torch: kiln-compile starts them first thing, so that their start-up overlaps its
own. Torch-free on purpose (importing kiln.regional imports torch)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile

REGION_COUNT = 4  # kiln.regional.REGIONS: head, double, single, tail
OFF = ("0", "off", "no", "false")


def bytecode_cache(environ=None, probe: str = "torch") -> str | None:
    """Where this process (and the processes it starts) keep Python bytecode, when the installed
    packages have none: then returns the directory it set (sys.pycache_prefix, and
    PYTHONPYCACHEPREFIX with PYTHONDONTWRITEBYTECODE removed in `environ`, default os.environ,
    for the region workers); else None.

    Why: a torch installed without bytecode (pip --no-compile, as on the GPU test host, where
    PYTHONDONTWRITEBYTECODE is also set) is compiled from source by every process that imports
    it: kiln-compile and each region worker spent ~14 s importing torch, Inductor and kiln.models
    there, 5 s with the bytecode cached (bench/gpu/import_probe.sh, H100 host, 2026-12-07), and
    those imports are on the critical path of a compile on a miss. With bytecode installed
    (`probe`'s package has its __pycache__ entry) nothing changes. The directory: KILN_PYCACHE,
    else $XDG_CACHE_HOME/kiln/pycache (~/.cache/kiln/pycache); KILN_PYCACHE=0 turns it off, and
    an operator's own PYTHONPYCACHEPREFIX is left as it is. Never writes into site-packages."""
    env = os.environ if environ is None else environ
    setting = env.get("KILN_PYCACHE", "")
    if setting.lower() in OFF or env.get("PYTHONPYCACHEPREFIX") or sys.pycache_prefix:
        return None
    try:
        spec = importlib.util.find_spec(probe)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    if os.path.exists(importlib.util.cache_from_source(spec.origin)):
        return None  # bytecode installed beside the sources
    path = setting or os.path.join(env.get("XDG_CACHE_HOME") or
                                   os.path.join(os.path.expanduser("~"), ".cache"),
                                   "kiln", "pycache")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    if not os.access(path, os.W_OK):
        return None
    sys.pycache_prefix = path
    sys.dont_write_bytecode = False
    env["PYTHONPYCACHEPREFIX"] = path
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return path


def start_workers(device: str, count: int) -> list:
    """Region compile processes started ahead of their work (`python -m kiln.regional --worker
    DEVICE`): each imports torch, torch.export and Inductor, initializes CUDA for a CUDA target,
    starts Inductor's compile-worker pool, and then waits for requests on stdin, one region a
    line (compile_regions sends them and closes it). kiln-compile starts them first thing, so
    that their start-up (on the GPU hosts ~15 s a process, four at once) overlaps its own
    (importing torch, the artifact key) instead of following it. stderr goes to a temporary file (a pipe nobody
    reads until the end could fill and stall a worker); stop_workers ends them all."""
    env = dict(os.environ)
    # Each region process has a pool of Inductor compile workers (Triton kernels), by default one
    # per CPU: four regions on the 16-CPU H100 host started 64, and the compile on a miss took
    # 71.1 s; one pool worker per CPU in all (4 each) 47.9 s, 2 each 52.0 s (2026-12-07,
    # bench/results/2026-12-07-h100-compile-miss/). An operator's setting wins.
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(max(1, _cpus() // max(1, count))))
    workers = []
    try:
        for _ in range(count):
            err = tempfile.TemporaryFile(mode="w+")
            try:
                proc = subprocess.Popen([sys.executable, "-m", "kiln.regional", "--worker", device],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=err, text=True, env=env)
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


def _cpus() -> int:
    """The CPUs this process may run on (its affinity: a container's share, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def regional_jobs() -> int:
    """How many region processes compile at once (regions are shared out among them):
    KILN_REGIONAL_JOBS, else one per region (4) where there are at least 16 CPUs (the GPU hosts),
    fewer on smaller machines (one per 4 CPUs), and none on fewer than 8 (1: the regions compile
    one after the other in the calling process; four torch processes on 2 cores only contend)."""
    return int(os.environ.get("KILN_REGIONAL_JOBS",
                              min(REGION_COUNT, max(1, _cpus() // 4))))
