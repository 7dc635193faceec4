"""kiln-run with LoRAs on the flux-tiny fixtures (scripts/test.sh): --lora NAME[:SCALE] with
--lora_dir merges a seeded LoRA (kiln.make_lora) and reports the set; --lora_switches alternates
base / LoRA in one process after the first image, each
switch split into the merge into new weight tensors in the encode stage (lora_prepare_s) and the
load into the package (lora_switch_s), or with --nolora_prepare_ahead merged at the switch, for the same bytes; a
LoRA that is not there, or a bad --lora, exits 2 with an error naming it."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from run_fixtures import BIN, FIXTURE_ARGS, PACKAGES, REPO, TESTDATA, needs

pytestmark = needs("packages")


def kiln_run(*args: str):
    argv = [os.path.join(BIN, "kiln-run"), "--model", REPO, "--package_dir",
            PACKAGES, "--nocompile", "--json", *FIXTURE_ARGS, *args]
    return subprocess.run(argv, capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("loras")
    subprocess.run([sys.executable, "-m", "kiln.make_lora", "make", "--model", REPO, "--out",
                    str(out), "--name", "style", "--layout", "kohya", "--rank", "4"], check=True)
    return str(out)


def test_lora_switches_in_one_process_and_back_to_the_base_bytes(tmp_path, lora_dir):
    out = tmp_path / "lora.png"
    proc = kiln_run("--lora", "style:0.7", "--lora_dir", lora_dir, "--lora_switches", "3",
                    "--out", str(out))
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    j = json.loads(proc.stdout)
    assert j["loras"] == "style@0.699999988"
    assert out.read_bytes() != open(os.path.join(TESTDATA, "first.png"), "rb").read()
    switches = j["lora_switches"]
    assert [s["loras"] for s in switches] == ["", "style@0.699999988", ""]
    assert all(s["switched"] for s in switches)
    assert all(s["lora_switch_s"] > 0 for s in switches)
    # Each job's set was merged ahead in its encode stage; its switch only swapped the buffers.
    assert all(s["prepared"] for s in switches)
    assert all(s["lora_prepare_s"] > 0 for s in switches)
    assert j["seconds"]["lora_prepare"] > 0  # the first image's set too

    at_switch = tmp_path / "at-switch.png"
    proc = kiln_run("--lora", "style:0.7", "--lora_dir", lora_dir, "--lora_switches", "2",
                    "--nolora_prepare_ahead", "--out", str(at_switch))
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    switches = json.loads(proc.stdout)["lora_switches"]
    assert [s["prepared"] for s in switches] == [False, False]
    assert all(s["lora_prepare_s"] == 0 for s in switches)
    assert at_switch.read_bytes() == out.read_bytes()


def test_a_missing_lora_or_a_bad_flag_exits_2_naming_it(tmp_path, lora_dir):
    proc = kiln_run("--lora", "absent", "--lora_dir", lora_dir, "--out", str(tmp_path / "x.png"))
    assert proc.returncode == 2
    assert os.path.join(lora_dir, "absent.safetensors").encode() in proc.stderr
    proc = kiln_run("--lora", "style:lots", "--lora_dir", lora_dir, "--out", str(tmp_path / "x.png"))
    assert proc.returncode == 2
    assert b"--lora: 'style:lots': scale 'lots'" in proc.stderr
