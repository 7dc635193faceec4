"""kiln's fused fp8 quantization kernels (kiln.models.fused_quant) at flux-dev's shapes, side by
side with what they replace, on one GPU in one run:

  kernel     kiln::modulate_quant / kiln::gelu_quant (Triton, one row per program)
  unfused    torch.compile of the unfused composition, quantize_rows(modulate(...)) or
             quantize_rows(cat(a, gelu(m))): Inductor's fusion, what an fp8 package runs without
             the option
  bf16       torch.compile of the producer alone in bf16 (modulate, or cat(a, gelu(m))): what the
             bf16 precision runs at the same spot, the bar of issue 13's item 3

and the kernel against its reference (the same function in torch ops, float32): the share of
equal e4m3 bytes, the largest relative difference of the scales, and the error of the
dequantized rows. GB/s counts each tensor read or written once (the kernel's floor).

    python3 bench/gpu/fused_quant_bench.py --out DIR [--iters 50]

Writes DIR/fused-quant.json and DIR/fused-quant-table.txt (also printed).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baselines as B  # noqa: E402
from kiln.models import fused_quant as fq  # noqa: E402
from kiln.models import quant  # noqa: E402
from kiln.models.flux import modulate  # noqa: E402

DIM, MLP, TXT, IMG = 3072, 12288, 512, 4096  # flux-dev at 1024²: 512 text + 4096 image tokens


def cases(dev: torch.device) -> list[dict]:
    g = torch.Generator(device=dev).manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=dev) * scale).to(torch.bfloat16)

    out = []
    for name, n in (("modulate, double block image", IMG), ("modulate, single block", TXT + IMG),
                    ("modulate, double block text", TXT)):
        x, sh, sc = randn(1, n, DIM, scale=4.0), randn(1, DIM), randn(1, DIM, scale=0.5)
        out.append({"name": name, "rows": n, "cols": DIM,
                    "kernel": lambda x=x, sh=sh, sc=sc: fq.modulate_quant_op(x, sh, sc),
                    "reference": lambda x=x, sh=sh, sc=sc: fq.modulate_quant_reference(x, sh, sc),
                    "unfused": lambda x=x, sh=sh, sc=sc: quant.quantize_rows(modulate(x, sh, sc)),
                    "bf16": lambda x=x, sh=sh, sc=sc: modulate(x, sh, sc),
                    "bytes_in": x.numel() * 2, "bytes_out": x.numel() + n * 4})
    for name, n, ka in (("gelu, double block image MLP", IMG, 0),
                        ("cat(attention, gelu), single block", TXT + IMG, DIM)):
        m = randn(n, MLP, scale=2.0)
        a = randn(n, ka) if ka else None

        def unfused(a=a, m=m):
            y = F.gelu(m, approximate="tanh")
            return quant.quantize_rows(y if a is None else torch.cat([a, y], dim=-1))

        def bf16(a=a, m=m):
            y = F.gelu(m, approximate="tanh")
            return y if a is None else torch.cat([a, y], dim=-1)
        out.append({"name": name, "rows": n, "cols": ka + MLP,
                    "kernel": lambda a=a, m=m: fq.gelu_quant_op(a, m),
                    "reference": lambda a=a, m=m: fq.gelu_quant_reference(a, m),
                    "unfused": unfused, "bf16": bf16,
                    "bytes_in": n * (ka + MLP) * 2, "bytes_out": n * (ka + MLP) + n * 4})
    return out


def compare(kernel: tuple, reference: tuple) -> dict:
    (q, s), (q_ref, s_ref) = kernel, reference
    same = (q.view(torch.uint8) == q_ref.view(torch.uint8)).double().mean().item()
    deq, deq_ref = q.double() * s.double(), q_ref.double() * s_ref.double()
    return {"bytes_equal": same,
            "scale_max_rel_diff": ((s - s_ref).abs() / s_ref).max().item(),
            "dequant_rel_err": ((deq - deq_ref).norm() / deq_ref.norm()).item()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--iters", type=int, default=50)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev = torch.device("cuda")
    rows, lines = [], []
    for case in cases(dev):
        r = {k: case[k] for k in ("name", "rows", "cols")}
        with torch.no_grad():
            r.update(compare(case["kernel"](), case["reference"]()))
            for form in ("kernel", "unfused", "bf16"):
                fn = case[form] if form == "kernel" else torch.compile(case[form], dynamic=False)
                r[f"{form}_ms"] = B.time_ms(fn, args.iters, warmup=3)["median"]
        moved = case["bytes_in"] + case["bytes_out"]
        r["kernel_gb_s"] = moved / (r["kernel_ms"] * 1e-3) / 1e9
        rows.append(r)
        print(json.dumps(r), flush=True)
        lines.append(f"{r['name']:>36} [{r['rows']:5d} x {r['cols']:5d}]: kernel "
                     f"{r['kernel_ms'] * 1e3:6.1f} us ({r['kernel_gb_s']:5.0f} GB/s), unfused "
                     f"{r['unfused_ms'] * 1e3:6.1f} us, bf16 {r['bf16_ms'] * 1e3:6.1f} us; "
                     f"vs reference: bytes equal {r['bytes_equal']:.5f}, scales "
                     f"{r['scale_max_rel_diff']:.1e}, dequant {r['dequant_rel_err']:.1e}")
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": rows}
    with open(os.path.join(args.out, "fused-quant.json"), "w") as f:
        json.dump(report, f, indent=1)
    table = "\n".join([f"fused quantization kernels on {report['device']}"] + lines)
    with open(os.path.join(args.out, "fused-quant-table.txt"), "w") as f:
        f.write(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
