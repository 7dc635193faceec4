"""The C++ pipeline running the regional transformer layout (compile option layout "regional",
pipeline/regional.h) end to end through kiln-run on the flux-tiny fixtures of scripts/test.sh:
KILN_TESTDATA/first-regional.{png,json} is the fixture image made with
`--compile_options '{"layout":"regional"}'` on a copy of the whole-layout packages
(KILN_TESTDATA/packages-regional), so only the transformer was compiled, on a miss, by kiln-compile.

Checked: the regional image is byte-identical to the whole-graph fixture image (first.png): on the
CPU both layouts run the same Inductor kernels on the same values (the region packages are the
whole graph cut at block boundaries, and the block loop is the same op sequence), so any byte of
difference is a bug, not rounding; a second run compiles nothing; the transformer's key differs
between layouts and the other components' keys do not; a damaged region package is refused.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from run_fixtures import BIN, FIXTURE_ARGS, PACKAGES, REPO, TESTDATA, needs

REGIONAL = os.path.join(TESTDATA, "packages-regional")
FIRST_REGIONAL = os.path.join(TESTDATA, "first-regional.json")
pytestmark = needs("first-regional.json", "packages-regional")

COMPONENTS = ("text_encoder", "text_encoder_2", "transformer", "vae_decoder")


def kiln_run(*args: str, packages: str = REGIONAL):
    argv = [os.path.join(BIN, "kiln-run"), "--model", REPO, "--package_dir", packages, "--json",
            "--nocompile", "--compile_options", '{"layout":"regional"}', *args]
    return subprocess.run(argv, capture_output=True, timeout=300)


def manifests(root: str) -> dict[str, dict]:
    out = {}
    for d in os.listdir(root):
        path = os.path.join(root, d, "manifest.json")
        if os.path.isfile(path):
            with open(path) as f:
                out[d] = json.load(f)
    return out


def image_error(a: bytes, b: bytes) -> str:
    """Max and mean absolute pixel difference of two PNGs (for the message when they differ)."""
    import numpy as np
    from PIL import Image
    import io
    x = np.asarray(Image.open(io.BytesIO(a)), dtype=np.int16)
    y = np.asarray(Image.open(io.BytesIO(b)), dtype=np.int16)
    d = np.abs(x - y)
    return f"max |diff| {d.max()} / 255, mean {d.mean():.4f}"


def test_fixture_compiled_only_the_transformer_regionally():
    with open(FIRST_REGIONAL) as f:
        first = json.load(f)
    assert first["compile_options"]["layout"] == "regional"
    assert first["packages"] == {"text_encoder": "local", "text_encoder_2": "local",
                                 "transformer": "compiled", "vae_decoder": "local"}, first
    assert first["seconds"]["compile"] > 0
    print(f"\nregional transformer compiled on a miss through kiln-run in "
          f"{first['seconds']['compile']:.1f} s (CPU, flux-tiny, 256x256)")


def test_regional_image_is_byte_identical_to_the_whole_graph_image():
    whole = open(os.path.join(TESTDATA, "first.png"), "rb").read()
    regional = open(os.path.join(TESTDATA, "first-regional.png"), "rb").read()
    assert regional == whole, image_error(regional, whole)


def test_second_run_compiles_nothing_and_gives_the_same_bytes(tmp_path):
    out = tmp_path / "again.png"
    proc = kiln_run(*FIXTURE_ARGS, "--out", str(out))
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    again = json.loads(proc.stdout)
    assert again["packages"] == {c: "local" for c in COMPONENTS}
    assert again["seconds"]["compile"] == 0
    assert out.read_bytes() == open(os.path.join(TESTDATA, "first-regional.png"), "rb").read()


def test_only_the_transformer_key_differs_between_layouts():
    whole, regional = manifests(PACKAGES), manifests(REGIONAL)
    added = set(regional) - set(whole)
    assert len(added) == 1, added  # the regional transformer set; the rest are shared
    (digest,) = added
    m = regional[digest]
    assert m["layout"] == "regional" and m["key"]["component"] == "transformer"
    assert sorted(m["regions"]) == ["double", "head", "single", "tail"]
    (whole_transformer,) = [w for w in whole.values() if w["key"]["component"] == "transformer"]
    assert whole_transformer["key"]["compile"] != m["key"]["compile"]
    assert {k: v for k, v in whole_transformer["key"].items() if k != "compile"} == \
        {k: v for k, v in m["key"].items() if k != "compile"}


def test_damaged_region_package_is_refused(tmp_path):
    packages = tmp_path / "packages"
    shutil.copytree(REGIONAL, packages)
    (digest,) = set(manifests(REGIONAL)) - set(manifests(PACKAGES))
    with open(packages / digest / "double.pt2", "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    proc = kiln_run(*FIXTURE_ARGS, "--out", str(tmp_path / "x.png"), packages=str(packages))
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode != 0 and proc.returncode < 128, err  # an error, not a crash
    assert "region double package sha256" in err, err
    assert not (packages / digest).exists()  # quarantined
