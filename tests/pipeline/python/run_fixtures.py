"""What the kiln-run tests share: the flux-tiny fixtures scripts/test.sh makes (KILN_TESTDATA),
the binaries (KILN_BIN), and the arguments the fixture image was made with (first.png)."""
from __future__ import annotations

import os

import pytest

TESTDATA = os.environ.get("KILN_TESTDATA", "")
BIN = os.environ.get("KILN_BIN", "")
REPO = os.path.join(TESTDATA, "flux-tiny")
PACKAGES = os.path.join(TESTDATA, "packages")
FIXTURE_ARGS = ["--prompt", "a lighthouse on a cliff at dusk", "--width", "256", "--height", "256",
                "--steps", "4", "--seed", "7"]


def needs(*paths: str) -> pytest.MarkDecorator:
    """Skips a module unless KILN_TESTDATA is set and every path under it exists."""
    present = bool(TESTDATA) and all(os.path.exists(os.path.join(TESTDATA, p)) for p in paths)
    return pytest.mark.skipif(not present, reason="needs the fixtures made by scripts/test.sh: "
                              + ", ".join(paths))
