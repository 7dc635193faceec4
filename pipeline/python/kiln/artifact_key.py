"""The artifact key (docs/architecture.md "The artifact key"), Python side.

Must produce the same canonical JSON and digest as cache/artifact_key.cc; tests/cache/
artifact_key_test.cc checks the two agree (through tests/pipeline/ref_artifact_key.py), and
tests/pipeline/python/test_artifact_key.py checks the code revision (`code_revision`).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any

COMPONENTS = ("text_encoder", "text_encoder_2", "transformer", "vae_decoder")
PRECISIONS = ("fp32", "bf16", "fp8")
_IGNORED_CONFIG_KEYS = ("transformers_version", "torch_dtype")
TOOLCHAIN_FIELDS = ("torch", "cuda", "triton", "kiln")
# The kiln Python package: the code kiln-compile runs to build a package's graph.
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_hex(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def architecture_digest(config: dict) -> str:
    kept = {k: v for k, v in config.items()
            if not k.startswith("_") and k not in _IGNORED_CONFIG_KEYS}
    return sha256_hex(canonical_json(kept))


def code_files(root: str = PACKAGE_DIR) -> list[str]:
    """The files of the kiln package under `root` that the code revision covers: every `*.py`,
    at any depth, as POSIX paths relative to `root`, sorted by their UTF-8 bytes (C locale
    order). `__pycache__` directories are skipped (bytecode is derived from the sources). The whole
    package rather than kiln-compile's import closure: a module reached by a way a static import
    scan cannot see (`python -m kiln.regional` region workers, importlib) would otherwise change
    a graph without changing the key; an edit to a tool kiln-compile never imports (make_tiny,
    make_lora, ...) costs a recompile after the upgrade, the safe error. Non-`.py` files
    (data/corpus.txt, read only by tokenizer_files) shape no graph and are left out. Twin of
    cache/code_revision.cmake, which builds the same list at build time."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in filenames:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                out.append(rel.replace(os.sep, "/"))
    return sorted(out, key=lambda p: p.encode())


def code_revision(root: str = PACKAGE_DIR) -> str:
    r"""Revision of the kiln code that shapes a compiled package (the key's `toolchain.kiln`):
    SHA-256 of `sha256sum`'s output for `code_files(root)`, i.e. of one line
    "<sha256 hex of the file's bytes>  <relative path>\n" per file in that order. From a shell:
    cd pipeline/python/kiln && find . -name __pycache__ -prune -o -name '*.py' -printf '%P\n' |
    LC_ALL=C sort | xargs sha256sum | sha256sum"""
    if root == PACKAGE_DIR:
        return _own_code_revision()
    return _code_revision(root)


def _code_revision(root: str) -> str:
    lines = []
    for rel in code_files(root):
        with open(os.path.join(root, rel), "rb") as f:
            lines.append(f"{sha256_hex(f.read())}  {rel}\n")
    return sha256_hex("".join(lines))


@functools.lru_cache(maxsize=1)
def _own_code_revision() -> str:
    return _code_revision(PACKAGE_DIR)


def default_compile_options() -> dict:
    """kiln's compile options unless told otherwise (cache::DefaultCompileOptions is the C++
    twin). Chosen by bench/gpu on an H100 (bench/README.md): cuDNN attention (660 TFLOP/s at
    flux-dev's shape, against 330 for flash and 163 for efficient, in the recorded run); fused QKV and autotuning
    left off where they did not pay."""
    return {"attention": "cudnn", "max_autotune": False}


def compile_options_digest(options: dict) -> str:
    return sha256_hex(canonical_json(options))


@dataclasses.dataclass(frozen=True)
class Bucket:
    batch: int = 1
    height: int = 0
    width: int = 0
    text_len: int = 0


@dataclasses.dataclass(frozen=True)
class ArtifactKey:
    architecture: str
    component: str
    precision: str
    bucket: Bucket
    compile: str
    target: str
    toolchain: dict  # {"torch": ..., "cuda": ..., "triton": ..., "kiln": code_revision()}

    def validate(self) -> None:
        if self.component not in COMPONENTS:
            raise ValueError(f"artifact key: component {self.component!r} is not one of {COMPONENTS}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"artifact key: precision {self.precision!r} is not one of {PRECISIONS}")
        if self.target != "cpu" and not self.target.startswith("cuda:sm_"):
            raise ValueError(f"artifact key: target {self.target!r} is neither cpu nor cuda:sm_XX")
        if self.precision == "fp8" and self.target == "cpu":
            raise ValueError("artifact key: precision fp8 needs a cuda target")
        kiln = self.toolchain.get("kiln", "")
        if len(kiln) != 64 or any(c not in "0123456789abcdef" for c in kiln):
            raise ValueError(f"artifact key: toolchain.kiln {kiln!r} is not a sha256 hex digest "
                             "(the code revision, kiln.artifact_key.code_revision)")

    def to_json(self) -> dict:
        return {
            "architecture": self.architecture,
            "component": self.component,
            "precision": self.precision,
            "bucket": dataclasses.asdict(self.bucket),
            "compile": self.compile,
            "target": self.target,
            "toolchain": {k: self.toolchain.get(k, "") for k in TOOLCHAIN_FIELDS},
        }

    def digest(self) -> str:
        return sha256_hex(canonical_json(self.to_json()))
