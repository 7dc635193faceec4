"""kiln-compile's bytecode cache (kiln.region_workers.bytecode_cache): where the installed
packages have no bytecode (torch installed with pip --no-compile, PYTHONDONTWRITEBYTECODE set, as
on the GPU test host), kiln-compile and its region workers keep theirs in a private directory;
elsewhere nothing changes. A stand-in package in a temporary directory plays torch.

Run: PYTHONPATH=pipeline/python .venv/bin/python -m pytest -q \
         tests/pipeline/python/test_bytecode_cache.py
"""
from __future__ import annotations

import os
import py_compile
import subprocess
import sys

import pytest

from kiln import region_workers as W


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A package `kilnfakepkg` on sys.path, without bytecode; the interpreter's bytecode settings
    restored after the test."""
    root = tmp_path / "site"
    (root / "kilnfakepkg").mkdir(parents=True)
    (root / "kilnfakepkg" / "__init__.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setattr(sys, "pycache_prefix", None)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    return root


def test_a_package_without_bytecode_gets_a_private_cache(package, tmp_path):
    cache = tmp_path / "pyc"
    env = {"KILN_PYCACHE": str(cache), "PYTHONDONTWRITEBYTECODE": "1", "KEEP": "yes"}
    assert W.bytecode_cache(env, probe="kilnfakepkg") == str(cache)
    assert sys.pycache_prefix == str(cache) and not sys.dont_write_bytecode
    assert env == {"KILN_PYCACHE": str(cache), "PYTHONPYCACHEPREFIX": str(cache), "KEEP": "yes"}
    # A process started with that environment (as a region worker is) writes its bytecode there
    # and nowhere in the package.
    subprocess.run([sys.executable, "-c", "import kilnfakepkg"], check=True,
                   env=dict(env, PYTHONPATH=str(package), PATH=os.environ.get("PATH", "")))
    written = [os.path.join(d, f) for d, _, files in os.walk(cache) for f in files]
    assert any(f.endswith(".pyc") and "kilnfakepkg" in f for f in written), written
    assert not (package / "kilnfakepkg" / "__pycache__").exists()


def test_the_default_directory_is_under_the_users_cache(package, tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    assert W.bytecode_cache(env, probe="kilnfakepkg") == str(tmp_path / "xdg" / "kiln" /
                                                              "pycache")
    assert (tmp_path / "xdg" / "kiln" / "pycache").is_dir()


def test_installed_bytecode_changes_nothing(package, tmp_path):
    source = package / "kilnfakepkg" / "__init__.py"
    import importlib.util
    py_compile.compile(str(source), cfile=importlib.util.cache_from_source(str(source)))
    env = {"KILN_PYCACHE": str(tmp_path / "pyc"), "PYTHONDONTWRITEBYTECODE": "1"}
    assert W.bytecode_cache(dict(env), probe="kilnfakepkg") is None
    assert sys.pycache_prefix is None and sys.dont_write_bytecode
    assert not (tmp_path / "pyc").exists()


@pytest.mark.parametrize("env", [{"KILN_PYCACHE": "0"}, {"KILN_PYCACHE": "off"},
                                 {"PYTHONPYCACHEPREFIX": "/operators/own"}])
def test_turned_off_or_the_operators_own_prefix(package, env):
    before = dict(env)
    assert W.bytecode_cache(env, probe="kilnfakepkg") is None
    assert env == before and sys.pycache_prefix is None


def test_an_unusable_directory_is_skipped(package, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {"KILN_PYCACHE": str(blocker / "pycache")}  # under a file: cannot be made
    assert W.bytecode_cache(env, probe="kilnfakepkg") is None
    assert "PYTHONPYCACHEPREFIX" not in env and sys.pycache_prefix is None


def test_a_missing_package_is_skipped(package):
    assert W.bytecode_cache({}, probe="kiln_no_such_package") is None
