"""Records every child process a Python process starts through `subprocess` (issue 13: where a
regional package's compile on a miss goes; cProfile on the H100 put 36 s of the double block's
66 s in 18 `subprocess.check_call`s without saying what they ran).

Active only when KILN_TRACE_CHILDREN names a directory, and only for Python processes that have
this directory on PYTHONPATH (which children inherit): each writes
KILN_TRACE_CHILDREN/children-<pid>.jsonl, one line when a child starts and one when it is waited
for (`wait()`, which `call`, `check_call`, `run` and `communicate` all end in), with its argv,
start time and seconds. A child only polled (Inductor's compile workers) has its start line alone.
`python bench/gpu/trace_children/summary.py DIR` tables them. A bench aid: not used by kiln.

With KILN_TRACE_SAMPLE (seconds, e.g. 0.25) each traced process also samples its main thread's
stack that often from a daemon thread, from its start (this file runs before `import torch`) to
the end of its atexit handlers, and appends them as "samples" lines: the gaps between children
(start, imports, export, teardown) get names. The handler that writes the last batch is
registered here, first, so it runs after every other atexit handler."""
import os

_DIR = os.environ.get("KILN_TRACE_CHILDREN")
if _DIR:
    import json
    import subprocess
    import threading
    import time

    _lock = threading.Lock()
    _path = os.path.join(_DIR, f"children-{os.getpid()}.jsonl")
    _init, _wait = subprocess.Popen.__init__, subprocess.Popen.wait

    def _argv(args) -> list:
        if isinstance(args, (str, bytes, os.PathLike)):
            args = [args]
        return [os.fsdecode(a)[:300] if isinstance(a, (str, bytes, os.PathLike)) else repr(a)
                for a in list(args)[:40]]

    def _write(record: dict) -> None:
        try:
            with _lock, open(_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError:
            pass  # tracing never breaks the traced process

    def _traced_init(self, *a, **kw):
        self._kiln_t0 = time.time()
        self._kiln_argv = _argv(kw.get("args", a[0] if a else []))
        _init(self, *a, **kw)
        _write({"event": "start", "parent": os.getpid(), "pid": self.pid,
                "argv": self._kiln_argv, "t": self._kiln_t0})

    def _traced_wait(self, timeout=None):
        rc = _wait(self, timeout)
        if hasattr(self, "_kiln_t0") and not getattr(self, "_kiln_logged", False):
            self._kiln_logged = True
            _write({"event": "end", "parent": os.getpid(), "pid": self.pid,
                    "argv": self._kiln_argv, "t": self._kiln_t0,
                    "seconds": round(time.time() - self._kiln_t0, 4), "rc": rc})
        return rc

    subprocess.Popen.__init__ = _traced_init
    subprocess.Popen.wait = _traced_wait

    _interval = float(os.environ.get("KILN_TRACE_SAMPLE") or 0)
    if _interval > 0:
        import atexit
        import sys

        _main_id = threading.main_thread().ident
        _samples: list = []
        _site = os.sep + "site-packages" + os.sep

        def _stack(frame) -> list:
            # innermost first: the 8 innermost frames, then only the ones that say where the
            # process is (module bodies, i.e. imports, and kiln's own frames)
            out = []
            while frame is not None and len(out) < 400:
                code = frame.f_code
                path = code.co_filename
                if len(out) < 8 or code.co_name == "<module>" or "kiln" in path:
                    short = (path.split(_site, 1)[1] if _site in path
                             else os.sep.join(path.split(os.sep)[-2:]))
                    out.append(f"{short}:{code.co_name}")
                frame = frame.f_back
            return out

        def _flush() -> None:
            with _lock:
                batch = _samples[:]
                del _samples[:]
            if batch:
                _write({"event": "samples", "pid": os.getpid(), "argv": _argv(sys.argv),
                        "interval": _interval, "samples": batch})

        def _sampler() -> None:
            last = time.time()
            while True:
                time.sleep(_interval)
                frame = sys._current_frames().get(_main_id)
                if frame is None:
                    continue
                _samples.append([round(time.time(), 3), _stack(frame)])
                if time.time() - last > 5:
                    last = time.time()
                    _flush()

        _samples.append([round(time.time(), 3), ["(python started)"]])
        atexit.register(lambda: (_samples.append([round(time.time(), 3), ["(atexit done)"]]),
                                 _flush()))
        threading.Thread(target=_sampler, name="kiln-trace-sampler", daemon=True).start()
