"""Fixtures for tests/pipeline/weights_test.cc: a small checkpoint with known tensors and the
derived constants kiln.models.quant computes from it (the Python side of the load-time
derivations), so the C++ loader can be compared with it byte for byte.

    ref_derive.py OUT_DIR

Writes, under OUT_DIR:
  ckpt/model.safetensors   sources: q/k/v weights in float32, bfloat16 and float16 (a fused
                           projection may mix them), their biases, and rows that exercise the
                           edges of the quantization (all-zero row, amax below the 1e-12 floor,
                           huge values, exact e4m3 rounding ties, e4m3 subnormals)
  expected.safetensors     every derived constant, as Python computes it
  constants.json           the manifest "constants" object for them (kiln-compile's format)
"""
from __future__ import annotations

import json
import os
import sys

import torch
from safetensors.torch import save_file

from kiln.models.quant import Derive, derive

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16",
               torch.float8_e4m3fn: "float8_e4m3fn"}


def sources() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    q = torch.randn(32, 48, generator=g)
    q *= torch.logspace(-4, 4, 32)[:, None]          # row magnitudes over 8 decades
    q[0] = 0.0                                        # all-zero row: scale at the floor
    q[1] = torch.randn(48, generator=g) * 1e-14      # amax below the 1e-12 floor
    q[2] = torch.randn(48, generator=g) * 1e30       # huge, finite
    # amax 448 -> scale exactly 1: the values below land on e4m3 rounding ties and subnormals.
    ties = [448.0, 1.0625, 1.1875, -1.0625, 2.0**-10, 3 * 2.0**-10, -(2.0**-7), 0.5 + 2.0**-5,
            240.0, 232.0, 2.0**-9, 17.0]
    q[3] = 0.0
    q[3, :len(ties)] = torch.tensor(ties)
    k = (torch.randn(16, 48, generator=g) * 0.02).to(torch.bfloat16)
    v = (torch.randn(16, 48, generator=g) * 3.0).to(torch.float16)
    return {
        "attn.to_q.weight": q, "attn.to_k.weight": k, "attn.to_v.weight": v,
        "attn.to_q.bias": torch.randn(32, generator=g),
        "attn.to_k.bias": torch.randn(16, generator=g).to(torch.bfloat16),
        "attn.to_v.bias": torch.randn(16, generator=g),
    }


def derived() -> dict[str, tuple[Derive, torch.dtype]]:
    qkv_w = ("attn.to_q.weight", "attn.to_k.weight", "attn.to_v.weight")
    qkv_b = ("attn.to_q.bias", "attn.to_k.bias", "attn.to_v.bias")
    return {
        # fuse_qkv + fp8: the fused weight quantized, its scale, the fused bias in bf16.
        "attn.to_qkv.weight": (Derive("fp8_rowwise", qkv_w), torch.float8_e4m3fn),
        "attn.to_qkv.weight_scale": (Derive("fp8_rowwise_scale", qkv_w), torch.float32),
        "attn.to_qkv.bias": (Derive("concat0", qkv_b), torch.bfloat16),
        # fp8 alone: a weight named like its checkpoint tensor, with a different dtype.
        "attn.to_q.weight": (Derive("fp8_rowwise", ("attn.to_q.weight",)), torch.float8_e4m3fn),
        "attn.to_q.weight_scale": (Derive("fp8_rowwise_scale", ("attn.to_q.weight",)),
                                   torch.float32),
        # fuse_qkv alone, in float32.
        "attn.fused_f32.weight": (Derive("concat0", qkv_w), torch.float32),
    }


def main() -> None:
    out = sys.argv[1]
    os.makedirs(os.path.join(out, "ckpt"), exist_ok=True)
    src = sources()
    save_file(src, os.path.join(out, "ckpt", "model.safetensors"))
    expected, constants = {}, {}
    for name, (rule, dtype) in derived().items():
        t = derive(rule.op, [src[s] for s in rule.sources], dtype).contiguous()
        expected[name] = t
        constants[name] = {"shape": list(t.shape), "dtype": DTYPE_NAMES[dtype],
                           "source": "checkpoint", "derive": rule.to_json()}
    # A plain checkpoint constant beside them (cast to bf16), as manifests mix both.
    expected["attn.to_k.bias"] = src["attn.to_k.bias"]
    constants["attn.to_k.bias"] = {"shape": [16], "dtype": "bfloat16", "source": "checkpoint"}
    save_file(expected, os.path.join(out, "expected.safetensors"))
    with open(os.path.join(out, "constants.json"), "w") as f:
        json.dump(constants, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
