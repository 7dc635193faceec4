"""The artifact key (../shared/DESIGN.md "The artifact key"), Python side.

Must produce the same canonical JSON and digest as cache/artifact_key.cc; tests/cache/
artifact_key_test.cc and tests/pipeline/python/test_artifact_key.py check the two agree.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

COMPONENTS = ("text_encoder", "text_encoder_2", "transformer", "vae_decoder")
PRECISIONS = ("fp32", "bf16", "fp8")
_IGNORED_CONFIG_KEYS = ("transformers_version", "torch_dtype")


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_hex(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def architecture_digest(config: dict) -> str:
    kept = {k: v for k, v in config.items()
            if not k.startswith("_") and k not in _IGNORED_CONFIG_KEYS}
    return sha256_hex(canonical_json(kept))


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
    toolchain: dict  # {"torch": ..., "cuda": ..., "triton": ...}

    def validate(self) -> None:
        if self.component not in COMPONENTS:
            raise ValueError(f"artifact key: component {self.component!r} is not one of {COMPONENTS}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"artifact key: precision {self.precision!r} is not one of {PRECISIONS}")
        if self.target != "cpu" and not self.target.startswith("cuda:sm_"):
            raise ValueError(f"artifact key: target {self.target!r} is neither cpu nor cuda:sm_XX")
        if self.precision == "fp8" and self.target == "cpu":
            raise ValueError("artifact key: precision fp8 needs a cuda target")

    def to_json(self) -> dict:
        return {
            "architecture": self.architecture,
            "component": self.component,
            "precision": self.precision,
            "bucket": dataclasses.asdict(self.bucket),
            "compile": self.compile,
            "target": self.target,
            "toolchain": {k: self.toolchain.get(k, "") for k in ("torch", "cuda", "triton")},
        }

    def digest(self) -> str:
        return sha256_hex(canonical_json(self.to_json()))
