"""deploy/container: cheap checks of the Containerfile that `make test` can afford (building the
image is `make image`, minutes long): every COPY source exists in the build context and is not
excluded by the ignore file, the stages COPY --from name stages that exist, the build script
parses, and every Debian shared library the built executables load is installed by the runtime
stage (a missing runtime package would only show when the image runs)."""
from __future__ import annotations

import fnmatch
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONTAINER = ROOT / "deploy" / "container"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Containerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (CONTAINER / "Containerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def ignore_patterns() -> list[str]:
    lines = (CONTAINER / "containerignore").read_text().splitlines()
    return [p.strip() for p in lines if p.strip() and not p.startswith("#")]


def ignored(rel: str) -> bool:
    for pattern in ignore_patterns():
        pattern = pattern.lstrip("/")
        if fnmatch.fnmatch(rel, pattern) or fnmatch.fnmatch(rel, pattern.replace("**/", "")):
            return True
        if rel.startswith(pattern.rstrip("/") + "/"):
            return True
    return False


def stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions."""
    out: dict[str, list[tuple[str, str]]] = {}
    current = None
    for word, rest in instructions():
        if word == "FROM":
            m = re.match(r"\S+\s+AS\s+(\S+)", rest, re.I)
            assert m, f"every stage is named: FROM {rest}"
            current = m.group(1)
            out[current] = []
        elif current is not None:
            out[current].append((word, rest))
    return out


def test_the_stages_are_build_coordinator_and_node() -> None:
    names = list(stages())
    assert names[0] == "build"
    assert {"coordinator", "node"} <= set(names)


def test_copy_sources_exist_in_the_build_context() -> None:
    copies = 0
    for stage, body in stages().items():
        for word, rest in body:
            if word not in ("COPY", "ADD"):
                continue
            args = shlex.split(rest)
            from_stage = next((a.split("=", 1)[1] for a in args if a.startswith("--from=")),
                              None)
            paths = [a for a in args if not a.startswith("--")]
            sources = paths[:-1]
            assert sources, f"{stage}: {word} {rest}"
            if from_stage is not None:
                assert from_stage in stages(), f"{stage}: COPY --from={from_stage}: no stage"
                continue
            for src in sources:
                copies += 1
                if src == ".":
                    continue
                assert (ROOT / src).exists(), f"{stage}: COPY {src}: not in the repository"
                assert not ignored(src), f"{stage}: COPY {src}: excluded by containerignore"
    assert copies >= 2


def test_the_ignore_file_keeps_what_cmake_needs() -> None:
    cmake = (ROOT / "CMakeLists.txt").read_text()
    needed = set(re.findall(r"add_subdirectory\((\w+)\)", cmake))
    m = re.search(r"foreach\(component ([\w ]+)\)", cmake)
    if m:
        needed |= set(m.group(1).split())
    needed |= {"CMakeLists.txt", "requirements.txt", "pipeline/python/kiln"}
    for path in needed:
        if (ROOT / path).exists():
            assert not ignored(path), f"containerignore excludes {path}, which the build needs"
    for path in ("build", ".venv", ".git", ".kiln", "out", "pipeline/python/kiln/__pycache__"):
        assert ignored(path), f"containerignore should exclude {path}"


def test_the_build_scripts_parse() -> None:
    for script in ("build.sh", "base.sh"):
        r = subprocess.run(["bash", "-n", str(CONTAINER / script)], capture_output=True,
                           text=True)
        assert r.returncode == 0, f"{script}: {r.stderr}"
        assert os.access(CONTAINER / script, os.X_OK), f"{script} is not executable"


def runtime_packages(stage: str) -> set[str]:
    """Debian packages apt-get installs in STAGE and the stages it is built FROM."""
    text = re.sub(r"\\\n", " ", (CONTAINER / "Containerfile").read_text())
    parent_of = {child: parent for parent, child in
                 re.findall(r"^FROM\s+(\S+)\s+AS\s+(\S+)", text, re.M | re.I)}
    packages: set[str] = set()
    while stage in stages():
        for word, rest in stages()[stage]:
            if word == "RUN" and "apt-get install" in rest:
                part = rest.split("apt-get install", 1)[1].split("&&")[0]
                packages |= {w for w in part.split() if not w.startswith("-")}
        stage = parent_of.get(stage, "")
    return packages


def debian_packages_of(libraries: list[str]) -> dict[str, str]:
    """Library path -> the Debian package that installed it (absent: not from Debian)."""
    real = {os.path.realpath(lib): lib for lib in libraries}
    r = subprocess.run(["dpkg", "-S", *real], capture_output=True, text=True)
    out = {}
    for line in r.stdout.splitlines():
        package, _, path = line.partition(": ")
        if path in real:
            out[real[path]] = package
    return out


# Libraries every Debian image has (the base system's essential packages).
ESSENTIAL = {"libc6", "libgcc-s1", "libstdc++6", "zlib1g", "libbsd0", "libmd0", "libzstd1",
             "libgssapi-krb5-2", "libkrb5-3", "libk5crypto3", "libcom-err2", "libkrb5support0",
             "libkeyutils1"}


@pytest.mark.parametrize("stage,executables", [
    ("coordinator", ["kiln-coordinator", "kiln"]),
    ("node", ["kiln-node", "kiln-run", "kiln-canary", "kiln"]),
])
def test_runtime_stage_installs_every_library_the_executables_load(stage, executables) -> None:
    bin_dir = Path(os.environ.get("KILN_BIN", ROOT / "build" / "bin"))
    if not all((bin_dir / e).exists() for e in executables):
        pytest.skip(f"no built executables in {bin_dir}")
    installed = runtime_packages(stage) | ESSENTIAL
    for exe in executables:
        ldd = subprocess.run(["ldd", str(bin_dir / exe)], capture_output=True, text=True,
                             check=True).stdout
        readelf = subprocess.run(["readelf", "-d", str(bin_dir / exe)], capture_output=True,
                                 text=True, check=True).stdout
        # Only the executable's own NEEDED entries: their dependencies come with their packages.
        needed = set(re.findall(r"\(NEEDED\)\s+Shared library: \[(\S+)\]", readelf))
        assert needed, f"readelf found no NEEDED entries in {exe}"
        libraries = {name: path for name, path in re.findall(r"^\s*(\S+) => (/\S+)", ldd, re.M)
                     if name in needed}
        from_torch = [n for n, p in libraries.items() if "/site-packages/" in p]
        # LibTorch comes from the wheel installed in the node image, never in the coordinator's.
        assert stage == "node" or not from_torch, f"{exe} loads {from_torch} from PyTorch"
        packages = debian_packages_of([p for n, p in libraries.items() if n not in from_torch])
        for path, package in packages.items():
            # (dpkg -S may name several packages, "a:amd64, b:amd64"; one installed will do)
            names = {p.strip().split(":")[0] for p in package.split(",")}
            assert names & installed, \
                f"{exe} loads {path} from Debian package {package}, not installed in {stage}"
