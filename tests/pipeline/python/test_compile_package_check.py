"""kiln-compile's check of a freshly written package (kiln.compile.package_problem) and its
compile-again loop (kiln.compile.aoti_package): Inductor zips a graph's metadata and library up
from its shared cache directory after releasing the lock it wrote them under, so another compile
of the same graph can spoil them in between (pipeline/README.md). The race itself is not
reproduced here (it needs two compiles meeting inside a few milliseconds); the packages are
built by hand, from one real package of the fixtures, spoiled the ways the race spoils them.

Run: KILN_TESTDATA=... PYTHONPATH=pipeline/python .venv/bin/python -m pytest -q \
         tests/pipeline/python/test_compile_package_check.py
"""
from __future__ import annotations

import glob
import json
import os
import zipfile

import pytest

from kiln import compile as kc

TESTDATA = os.environ.get("KILN_TESTDATA", "")


def _fixture_package() -> tuple[str, str]:
    """(path, digest) of a real package of the fixtures (the smallest)."""
    paths = glob.glob(os.path.join(TESTDATA, "packages", "*", kc.PACKAGE_FILE))
    if not paths:
        pytest.skip("needs KILN_TESTDATA with the fixture packages")
    path = min(paths, key=os.path.getsize)
    return path, os.path.basename(os.path.dirname(path))


def _rewrite(src: str, dst: str, change) -> None:
    """Copies package src to dst, member by member, with change(name, bytes) -> bytes."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, change(info.filename, zin.read(info.filename)))


def test_a_whole_package_passes():
    path, digest = _fixture_package()
    assert kc.package_problem(path, digest) is None


@pytest.mark.parametrize("spoil, expect", [
    (lambda n, b: b"" if n.endswith("_metadata.json") else b, "is empty or not a JSON object"),
    (lambda n, b: b[:17] if n.endswith("_metadata.json") else b, "is not JSON"),
    (lambda n, b: json.dumps(dict(json.loads(b), **{"kiln.digest": "f" * 64})).encode()
     if n.endswith("_metadata.json") else b, "names digest 'ffffffffffff'"),
    (lambda n, b: b[: len(b) // 2] if n.endswith(".so") else b, "is truncated"),
    (lambda n, b: b"" if n.endswith(".so") else b, "is not a 64-bit ELF file (0 bytes)"),
])
def test_a_spoiled_package_is_named(tmp_path, spoil, expect):
    path, digest = _fixture_package()
    bad = str(tmp_path / "model.pt2")
    _rewrite(path, bad, spoil)
    problem = kc.package_problem(bad, digest)
    assert problem is not None and expect in problem, problem


def test_not_a_zip(tmp_path):
    bad = tmp_path / "model.pt2"
    bad.write_bytes(b"PK\x03\x04 not really")
    assert "not a readable zip" in kc.package_problem(str(bad), "0" * 64)


def test_a_spoiled_package_is_compiled_again(tmp_path, monkeypatch, capsys):
    # aoti_compile_and_package stood in for: the first package written is spoiled (another
    # compile's metadata), the second whole; the retry must not use the FX graph cache.
    import torch
    good, digest = _fixture_package()
    spoiled = str(tmp_path / "spoiled.pt2")
    _rewrite(good, spoiled, lambda n, b: json.dumps({"kiln.digest": "e" * 64}).encode()
             if n.endswith("_metadata.json") else b)
    calls = []

    def fake(ep, package_path, inductor_configs):
        calls.append(dict(inductor_configs))
        with open(spoiled if len(calls) == 1 else good, "rb") as src, \
                open(package_path, "wb") as dst:
            dst.write(src.read())
        return package_path
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", fake)
    out = str(tmp_path / "model.pt2")
    kc.aoti_package(None, out, {"always_keep_tensor_constants": True}, digest)
    assert len(calls) == 2
    assert "fx_graph_cache" not in calls[0] and calls[1]["fx_graph_cache"] is False
    assert kc.package_problem(out, digest) is None
    err = capsys.readouterr().err
    assert "names digest 'eeeeeeeeeeee'" in err and "attempt 1 of 3" in err


def test_a_package_spoiled_every_time_is_a_clear_error(tmp_path, monkeypatch):
    import torch
    good, _ = _fixture_package()
    calls = []

    def fake(ep, package_path, inductor_configs):
        calls.append(1)
        with open(good, "rb") as src, open(package_path, "wb") as dst:
            dst.write(src.read())
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", fake)
    with pytest.raises(RuntimeError, match="after 3 attempts"):
        kc.aoti_package(None, str(tmp_path / "model.pt2"), {}, "d" * 64)
    assert len(calls) == kc.PACKAGE_ATTEMPTS
