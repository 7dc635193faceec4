"""Signed packages end to end with kiln-run on the flux-tiny fixtures (issue 12): packages signed
with `kiln signing-key sign` load; a tampered shim package (a .so whose constructor writes a
marker file) is refused and quarantined before any of its code runs; an untrusted signer and a
revoked key are refused; a package that verifies but cannot be loaded is quarantined instead of
failing every later job. Runs with --nocompile: nothing is rebuilt here (the provider's rebuilds
are tested in tests/cache/package_signing_test.cc), so each refusal is a failed run naming it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

TESTDATA = os.environ.get("KILN_TESTDATA", "")
BIN = os.environ.get("KILN_BIN", "")
SOURCE = os.environ.get("KILN_SOURCE", os.getcwd())
PACKAGES = os.path.join(TESTDATA, "packages")
REPO = os.path.join(TESTDATA, "flux-tiny")
pytestmark = pytest.mark.skipif(
    not (TESTDATA and os.path.isdir(PACKAGES) and BIN), reason="needs the fixtures made by scripts/test.sh")

ARGS = ["--prompt", "a lighthouse on a cliff at dusk", "--width", "256", "--height", "256",
        "--steps", "2", "--seed", "7"]


def kiln(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(BIN, "kiln"), *args], capture_output=True, text=True,
                          timeout=60)


def digests(root: str) -> dict[str, str]:
    """component -> package directory under `root`."""
    out = {}
    for d in os.listdir(root):
        m = os.path.join(root, d, "manifest.json")
        if os.path.isfile(m):
            out[json.load(open(m))["key"]["component"]] = os.path.join(root, d)
    return out


class Setup:
    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.packages = str(tmp_path / "packages")
        shutil.copytree(PACKAGES, self.packages)
        self.key = str(tmp_path / "keys" / "node.key")
        os.makedirs(tmp_path / "trusted")
        self.trusted = str(tmp_path / "trusted")
        self.new_key(self.key, trusted=True)
        for d in digests(self.packages).values():
            self.sign(self.key, d)

    def new_key(self, path: str, trusted: bool) -> str:
        proc = kiln("signing-key", "new", path)
        assert proc.returncode == 0, proc.stderr
        pub = path[:-4] + ".pub"
        if trusted:
            shutil.copy(pub, self.trusted)
        return open(pub).read().split()[0]

    def sign(self, key: str, package_dir: str) -> None:
        proc = kiln("signing-key", "sign", key, package_dir)
        assert proc.returncode == 0, proc.stderr

    def run(self, *extra: str, trusted: bool = True) -> subprocess.CompletedProcess:
        argv = [os.path.join(BIN, "kiln-run"), "--model", REPO, "--package_dir", self.packages,
                "--nocompile", "--out", str(self.tmp / "out.png"), *ARGS, *extra]
        if trusted:
            argv += ["--trusted_keys", self.trusted]
        return subprocess.run(argv, capture_output=True, text=True, timeout=300)

    def quarantined(self) -> list[str]:
        q = os.path.join(self.packages, "quarantine")
        return sorted(os.listdir(q)) if os.path.isdir(q) else []


def test_signed_packages_load(tmp_path):
    s = Setup(tmp_path)
    proc = s.run()
    assert proc.returncode == 0, proc.stderr
    assert s.quarantined() == []


def test_tampered_shim_is_refused_before_any_of_its_code_runs(tmp_path):
    s = Setup(tmp_path)
    marker = tmp_path / "shim-ran"
    vae = digests(s.packages)["vae_decoder"]
    control = str(tmp_path / "control")
    shutil.copytree(vae, control)
    for pkg in (vae, control):
        subprocess.run([os.environ.get("KILN_PYTHON", "python3"),
                        os.path.join(SOURCE, "tests/pipeline/tamper_package.py"), pkg,
                        "--shim", str(marker)], check=True)
    proc = s.run()
    assert proc.returncode != 0
    assert not marker.exists(), "the shim's constructor ran"
    assert "signature does not match" in proc.stderr and "was changed" in proc.stderr
    assert [q.split("-")[0] for q in s.quarantined()] == [os.path.basename(vae)]
    assert not os.path.exists(vae)
    # The control: the same shim without a trust set is loaded and runs (today's behaviour).
    shutil.move(control, vae)
    proc = s.run(trusted=False)
    assert marker.exists(), proc.stderr


def test_untrusted_signer_is_refused(tmp_path):
    s = Setup(tmp_path)
    stranger = str(tmp_path / "stranger" / "stranger.key")
    s.new_key(stranger, trusted=False)
    t5 = digests(s.packages)["text_encoder_2"]
    s.sign(stranger, t5)
    proc = s.run()
    assert proc.returncode != 0
    assert "is not in this node's trust set" in proc.stderr
    assert len(s.quarantined()) == 1 and not os.path.exists(t5)


def test_revoked_key_and_revoked_package_are_refused(tmp_path):
    s = Setup(tmp_path)
    public = open(s.key[:-4] + ".pub").read().split()[0]
    revoked = tmp_path / "revoked.txt"
    revoked.write_text(f"key {public}\n")
    proc = s.run("--revocation_file", str(revoked))
    assert proc.returncode != 0
    assert "is revoked" in proc.stderr
    assert len(s.quarantined()) >= 1

    s2 = Setup(tmp_path / "second")
    vae = digests(s2.packages)["vae_decoder"]
    sha = json.load(open(os.path.join(vae, "manifest.json")))["package"]["sha256"]
    revoked.write_text(f"# bad build\npackage {sha}\n")
    proc = s2.run("--revocation_file", str(revoked))
    assert proc.returncode != 0
    assert [q.split("-")[0] for q in s2.quarantined()] == [os.path.basename(vae)]


def test_package_that_verifies_but_does_not_load_is_quarantined_not_kept(tmp_path):
    s = Setup(tmp_path)
    vae = digests(s.packages)["vae_decoder"]
    good = str(tmp_path / "good-vae")
    shutil.copytree(vae, good)
    subprocess.run([os.environ.get("KILN_PYTHON", "python3"),
                    os.path.join(SOURCE, "tests/pipeline/tamper_package.py"), vae, "--garbage"],
                   check=True)
    s.sign(s.key, vae)  # signed by a trusted key: only loading can tell
    proc = s.run()
    assert proc.returncode != 0
    assert "quarantined" in proc.stderr, proc.stderr
    assert [q.split("-")[0] for q in s.quarantined()] == [os.path.basename(vae)]
    # Nothing poisoned is left behind: the good package put back serves at once.
    shutil.copytree(good, vae)
    proc = s.run()
    assert proc.returncode == 0, proc.stderr


def test_kiln_signing_key_revoke_writes_the_clusters_list(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    key = str(tmp_path / "k.key")
    assert kiln("signing-key", "new", key).returncode == 0
    assert kiln("signing-key", "new", key).returncode != 0  # never overwrites a key
    assert oct(os.stat(key).st_mode & 0o777) == "0o600"
    public = open(str(tmp_path / "k.pub")).read().split()[0]
    proc = kiln("signing-key", "revoke", "key", str(tmp_path / "k.pub"), "--shared-cache",
                str(shared))
    assert proc.returncode == 0, proc.stderr
    sha = "ab" * 32
    assert kiln("signing-key", "revoke", "package", sha, "--shared-cache",
                str(shared)).returncode == 0
    assert (shared / "revoked.txt").read_text() == f"key {public}\npackage {sha}\n"
    bad = kiln("signing-key", "revoke", "package", "nothex", "--shared-cache", str(shared))
    assert bad.returncode == 2 and "64 hex" in bad.stderr

