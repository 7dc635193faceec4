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


def record(package_path: str, constants: dict[str, dict], inputs, precision: str,
           out_dir: str) -> dict:
    """Runs the package at `package_path` on synthetic constants and `inputs`, writes
    out_dir/canary.safetensors (input.<i>, output.<i>) and returns the manifest's `canary`."""
    import torch
    from safetensors.torch import save_file

    # The package is loaded as the C++ node loads it (pipeline/aoti_package.cc): one runner, run
    # single-threaded on CUDA, on the inputs' device index, constants user-managed. On the H100
    # host the default Python loader (`aoti_load_package`: multi-threaded runner, no device index,
    # boxed_run) died with SIGSEGV in kiln-compile after every whole-graph CUDA compile; the
    # synthetic constants also outlive the loader here, since it holds their storage unowned.
    device = inputs[0].device if inputs else torch.device("cpu")
    cuda = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else -1
    loader = torch._C._aoti.AOTIModelPackageLoader(package_path, "model", cuda, 1, index)
    synthetic = synthetic_constants(constants, device)
    fqns = loader.get_constant_fqns()
    loader.load_constants({k: synthetic[k] for k in fqns}, False, True, True)
    with torch.no_grad():
        outputs = loader.run([t.contiguous() for t in inputs])
    if cuda:
        torch.cuda.synchronize(device)
    outputs = [t.detach().to("cpu").contiguous() for t in outputs]
    del loader
    del synthetic
    tensors = {}
    for i, t in enumerate(inputs):
        tensors[f"input.{i}"] = t.detach().to("cpu").contiguous()
    for i, t in enumerate(outputs):
        tensors[f"output.{i}"] = t
    save_file(tensors, os.path.join(out_dir, CANARY_FILE))
    return {"file": CANARY_FILE, "constants": CONSTANTS_RECIPE, "inputs": len(inputs),
            "outputs": len(outputs), "metric": "relative_l2",
            "tolerance": TOLERANCE[precision]}
