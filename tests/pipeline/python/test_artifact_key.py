"""kiln's code revision, the artifact key's `toolchain.kiln` (kiln.artifact_key.code_revision,
docs/architecture.md "The artifact key"): it changes with any byte, name, addition or removal of
a module of the kiln package and with nothing else; the build's twin (cache/code_revision.cmake)
and the shell recipe in the docstring agree with it on altered trees; kiln-compile refuses a
caller built from another revision, naming both. The C++ side (BuildKilnRevision, built in) is
compared with it in tests/cache/artifact_key_test.cc. No torch, no fixtures.

Run: PYTHONPATH=pipeline/python .venv/bin/python -m pytest -q \
         tests/pipeline/python/test_artifact_key.py
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from kiln import artifact_key as ak
from kiln import compile as kc

SOURCE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
CMAKE_SCRIPT = os.path.join(SOURCE, "cache", "code_revision.cmake")


@pytest.fixture
def tree(tmp_path) -> str:
    """A copy of the kiln package, without bytecode."""
    root = str(tmp_path / "kiln")
    shutil.copytree(ak.PACKAGE_DIR, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _flip_one_byte(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    i = len(data) // 2
    _write(path, data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:])
    return data


def test_a_copy_has_the_revision_of_the_package(tree):
    assert ak.code_revision(tree) == ak.code_revision()
    assert "models/flux.py" in ak.code_files(tree)
    assert "compile.py" in ak.code_files(tree)


def test_one_byte_of_a_model_changes_it(tree):
    before = ak.code_revision(tree)
    original = _flip_one_byte(os.path.join(tree, "models", "flux.py"))
    changed = ak.code_revision(tree)
    assert changed != before
    _write(os.path.join(tree, "models", "flux.py"), original)
    assert ak.code_revision(tree) == before


def test_adding_removing_or_renaming_a_module_changes_it(tree):
    before = ak.code_revision(tree)
    _write(os.path.join(tree, "models", "fp8_gemm.py"), b"X = 1\n")
    added = ak.code_revision(tree)
    os.remove(os.path.join(tree, "models", "fp8_gemm.py"))
    assert ak.code_revision(tree) == before
    os.rename(os.path.join(tree, "models", "vae.py"), os.path.join(tree, "models", "vae2.py"))
    renamed = ak.code_revision(tree)
    os.remove(os.path.join(tree, "models", "quant.py"))
    removed = ak.code_revision(tree)
    assert len({before, added, renamed, removed}) == 4


def test_files_that_are_not_code_do_not_change_it(tree):
    before = ak.code_revision(tree)
    _write(os.path.join(tree, "README.md"), b"# notes\n")
    _write(os.path.join(tree, "models", "NOTES.txt"), b"a design note\n")
    _flip_one_byte(os.path.join(tree, "data", "corpus.txt"))
    _write(os.path.join(tree, "__pycache__", "compile.cpython-312.pyc"), b"\0bytecode")
    _write(os.path.join(tree, "models", "__pycache__", "flux.py"), b"not a module\n")
    assert ak.code_revision(tree) == before


def _awkward(tree: str) -> None:
    """Names whose order differs between naive sorts: capitals, '_' against letters, a
    directory against a same-prefix file, non-ASCII."""
    _write(os.path.join(tree, "Zed.py"), b"z = 1\n")
    _write(os.path.join(tree, "models_x.py"), b"m = 2\n")
    _write(os.path.join(tree, "models", "a", "b.py"), b"b = 3\n")
    _write(os.path.join(tree, "\u00fcber.py"), "\u00fc = 4\n".encode())


def test_the_shell_recipe_of_the_docstring_agrees(tree):
    if not shutil.which("sha256sum") or not shutil.which("find"):
        pytest.skip("needs sha256sum and find")
    recipe = ("find . -name __pycache__ -prune -o -name '*.py' -printf '%P\\n' | LC_ALL=C sort | "
              "xargs sha256sum | sha256sum")
    assert recipe in " ".join(ak.code_revision.__doc__.split())
    _awkward(tree)
    out = subprocess.run(["sh", "-c", recipe], cwd=tree, check=True, capture_output=True,
                         text=True, env=dict(os.environ, LC_ALL="C")).stdout
    assert out.split()[0] == ak.code_revision(tree)


def _cmake_revision(root: str) -> str:
    out = subprocess.run(["cmake", f"-DPACKAGE={root}", "-P", CMAKE_SCRIPT], check=True,
                         capture_output=True, text=True).stdout
    return out.strip()


def test_the_build_computes_the_same_revision(tree):
    """cache/code_revision.cmake (what the C++ binaries carry) against Python, on the package,
    on an awkwardly named tree and after a one-byte change."""
    if not shutil.which("cmake"):
        pytest.skip("needs cmake")
    assert _cmake_revision(ak.PACKAGE_DIR) == ak.code_revision()
    _awkward(tree)
    _write(os.path.join(tree, "__pycache__", "x.py"), b"skipped by both\n")
    assert _cmake_revision(tree) == ak.code_revision(tree)
    _flip_one_byte(os.path.join(tree, "models", "t5.py"))
    assert _cmake_revision(tree) == ak.code_revision(tree)


def _key(**toolchain) -> ak.ArtifactKey:
    return ak.ArtifactKey(architecture="a" * 64, component="vae_decoder", precision="fp32",
                          bucket=ak.Bucket(1, 64, 64, 0), compile="c" * 64, target="cpu",
                          toolchain=toolchain)


def test_the_key_carries_and_requires_the_revision():
    key = _key(torch="2.13.0+cpu", cuda="", triton="", kiln=ak.code_revision())
    key.validate()
    assert key.to_json()["toolchain"]["kiln"] == ak.code_revision()
    other = _key(torch="2.13.0+cpu", cuda="", triton="", kiln="0" * 64)
    assert other.digest() != key.digest()
    for bad in ("", "0" * 63, "A" * 64):
        with pytest.raises(ValueError, match="toolchain.kiln"):
            _key(torch="2.13.0+cpu", kiln=bad).validate()
    # What kiln-compile keys by (no torch needed for a CPU target's revision).
    assert kc.revision_mismatch(None) is None
    assert kc.revision_mismatch(ak.code_revision()) is None


def test_kiln_compile_refuses_another_revision(capsys):
    other = ak.sha256_hex("a binary built from another checkout")
    # --height 0 is refused before any import of torch: it shows the revision check passed.
    args = ["--model", "/nonexistent", "--component", "vae_decoder", "--height", "0",
            "--width", "64", "--out-root", "/nonexistent"]
    assert kc.main(args + ["--kiln-revision", other]) == kc.REVISION_MISMATCH
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert other in err and ak.code_revision() in err
    assert "different checkouts" in err
    assert kc.main(args + ["--kiln-revision", ak.code_revision()]) == 2
    assert "--height 0" in capsys.readouterr().err
    assert kc.main(args) == 2
