"""The numerical canary of a compiled package: a small fixed input and the package's own output
on it, recorded at compile time, that a node recomputes after loading the package and before
serving with it (pipeline/canary.cc is the C++ twin). A package whose output disagrees was
miscompiled, built by a drifted toolchain or corrupted after signing-time checks, and is
quarantined.

A package is weightless, so the canary cannot use a model's weights (one package serves every
fine-tune of an architecture). It runs with *synthetic constants* that both sides compute from
the constant's index, shape and dtype alone (`synthetic_constant`: a sine of the element index,
scaled by 1/sqrt(last dim), made with the same ATen ops in C++ and Python), on the example inputs
of kiln.components (seeded; stored in canary.safetensors with the expected outputs).

Tolerance: relative L2 error ||out - expected|| / ||expected|| per output, with NaN/Inf where
the record has them. The same package code on the same kind of device differs only by the order
of floating-point reductions (thread counts, kernel choice), so:
  fp32  1e-4   unit roundoff 6e-8; reordered sums over ~1e4 terms stay far below 1e-5
  bf16  2e-2   unit roundoff 3.9e-3 (8-bit significand); a few dozen rounded intermediates in
               series give ~1e-2 in L2
  fp8   5e-2   weights are quantized identically on both sides; the slack covers bf16 activations
               around e4m3 (3-bit significand) matmuls
A miscompile or a changed kernel moves the output by O(1) relative error.
"""
from __future__ import annotations

import json
import math
import os

CANARY_FILE = "canary.safetensors"
CONSTANTS_RECIPE = "sin-index-v1"
TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2, "fp8": 5e-2}

# Irrational steps, so that neighbouring elements and constants do not repeat values.
_ELEMENT_STEP = 0.7548776662466927
_CONSTANT_STEP = 0.5698402909980532


def synthetic_constant(index: int, shape: list[int], dtype, device):
    """The canary's value for the constant at `index` (position of its FQN in sorted order)."""
    import torch
    n = 1
    for d in shape:
        n *= int(d)
    t = torch.arange(n, dtype=torch.float32, device=device)
    v = torch.sin(t * _ELEMENT_STEP + float(index) * _CONSTANT_STEP)
    scale = 1.0 / math.sqrt(float(shape[-1])) if len(shape) >= 2 and shape[-1] > 0 else 0.5
    return (v * scale).reshape(list(shape)).to(dtype)


def synthetic_constants(constants: dict[str, dict], device) -> dict:
    """FQN -> tensor for every constant of a manifest's `constants` table."""
    import torch
    out = {}
    for i, fqn in enumerate(sorted(constants)):
        spec = constants[fqn]
        out[fqn] = synthetic_constant(i, spec["shape"], getattr(torch, spec["dtype"]), device)
    return out


def record(package_path: str, manifest: dict, inputs, precision: str, out_dir: str) -> dict:
    """Runs the package at `package_path` (described by `manifest`, whose canary is not filled in
    yet) on synthetic constants and `inputs`, writes out_dir/canary.safetensors (input.<i>,
    output.<i>) and returns the manifest's `canary`.

    The run is made by kiln-canary (C++, pipeline/canary.h RecordCanary): the loader a node serves
    with, in a fresh process. Loading a CUDA package from Python (torch._inductor.aoti_load_package
    or AOTIModelPackageLoader) died with SIGSEGV in the loader's constructor on the H100 host with
    torch 2.11, for every package, also a plain nn.Linear compiled with default options, while the
    C++ loader serves them (bench/README.md). kiln-compile's wrapper names the binary in
    KILN_CANARY_BIN; without it (`python -m kiln.compile` outside a build) a CPU package's canary
    is run here, in Python, and a CUDA package's is an error."""
    import subprocess
    import tempfile
    import torch
    from safetensors.torch import save_file

    device = inputs[0].device if inputs else torch.device("cpu")
    out_path = os.path.join(out_dir, CANARY_FILE)
    tool = os.environ.get("KILN_CANARY_BIN", "")
    if tool and os.path.exists(tool):
        with tempfile.TemporaryDirectory(prefix="kiln-canary-") as tmp:
            manifest_path = os.path.join(tmp, "manifest.json")
            with open(manifest_path, "w") as f:
                json.dump(dict(manifest, canary=None), f)
            inputs_path = os.path.join(tmp, "inputs.safetensors")
            save_file({f"input.{i}": t.detach().to("cpu").contiguous()
                       for i, t in enumerate(inputs)}, inputs_path)
            r = subprocess.run([tool, "--manifest", manifest_path, "--package", package_path,
                                "--inputs", inputs_path, "--device", str(device),
                                "--out", out_path], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"canary: {tool} failed (exit {r.returncode}): "
                               f"{(r.stderr or '').strip()[-2000:]}")
        outputs = int(r.stdout.split()[-1])
    elif device.type == "cpu":
        outputs = _record_in_process(package_path, manifest["constants"], inputs, out_path)
    else:
        raise RuntimeError(f"canary: kiln-canary not found (KILN_CANARY_BIN='{tool}'); a {device} "
                           f"package's canary is recorded by kiln's C++ loader: run kiln-compile "
                           f"from a build's bin/ directory, or set KILN_CANARY_BIN")
    return {"file": CANARY_FILE, "constants": CONSTANTS_RECIPE, "inputs": len(inputs),
            "outputs": outputs, "metric": "relative_l2",
            "tolerance": TOLERANCE[precision]}


def _record_in_process(package_path: str, constants: dict[str, dict], inputs,
                       out_path: str) -> int:
    """record's CPU fallback without kiln-canary: the same run through PyTorch's Python loader."""
    import torch
    from safetensors.torch import save_file

    loader = torch._C._aoti.AOTIModelPackageLoader(package_path, "model", False, 1, -1)
    synthetic = synthetic_constants(constants, torch.device("cpu"))
    loader.load_constants({k: synthetic[k] for k in loader.get_constant_fqns()}, False, True, True)
    with torch.no_grad():
        outputs = loader.run([t.contiguous() for t in inputs])
    tensors = {f"input.{i}": t.detach().contiguous() for i, t in enumerate(inputs)}
    for i, t in enumerate(outputs):
        tensors[f"output.{i}"] = t.detach().contiguous()
    del loader, synthetic
    save_file(tensors, out_path)
    return len(outputs)
