"""Whole-graph against regional transformer packages (issue 13 item 1), one process, the same
weights and inputs: per-step ms of each (plain calls, and inside one CUDA graph where capture
works), the regional output's difference from the whole-graph one (byte-identical or max |diff|),
and both against eager. Packages are run through PyTorch's Python AOTI loader, both layouts the
same way, so the comparison is like for like; the C++ pipeline does not run regional sets yet.

    python3 bench/gpu/regional_bench.py --model M --whole PKGROOT_A --regional PKGROOT_B \
        --precision bf16 --height 1024 --width 1024 --text-len 512 --iters 20 > regional.json

PKGROOT_* are kiln-compile --out-root folders holding one transformer package set each (the first
`*/manifest.json` with the wanted layout is used). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import torch

from kiln import artifact_key as ak
from kiln import components as C
from kiln import regional as R


def find_manifest(root: str, layout: str) -> tuple[str, dict]:
    for path in sorted(glob.glob(os.path.join(root, "*", "manifest.json"))):
        with open(path) as f:
            m = json.load(f)
        if m["key"]["component"] == "transformer" and m.get("layout", "whole") == layout:
            return os.path.dirname(path), m
    raise SystemExit(f"regional_bench: no {layout} transformer package under {root}")


def timed(fn, iters: int, device: torch.device) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1000 / iters, out


def graphed(fn, iters: int, device: torch.device):
    """(ms per replay, output) of fn captured in one CUDA graph, or (None, error text)."""
    if device.type != "cuda":
        return None, "cpu"
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = fn()
        ms, _ = timed(lambda: g.replay(), iters, device)
        return ms, out
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        return None, f"{type(e).__name__}: {e}"[:300]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--whole", required=True)
    p.add_argument("--regional", required=True)
    p.add_argument("--precision", default="bf16", choices=ak.PRECISIONS)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    bucket = ak.Bucket(batch=1, height=args.height, width=args.width, text_len=args.text_len)
    cfg = C.read_component_config(args.model, "transformer")
    whole_dir, whole_m = find_manifest(args.whole, "whole")
    reg_dir, reg_m = find_manifest(args.regional, "regional")
    options = {k: v for k, v in reg_m["compile_options"].items() if k != "layout"}
    module, ex = C.build(cfg, "transformer", args.precision, bucket, device=device,
                         compile_options=options)
    C.load_weights(module, args.model, "transformer")
    state = module.state_dict()
    result = {"precision": args.precision, "bucket": [args.width, args.height, args.text_len],
              "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
              "compile_seconds": {"whole": whole_m.get("compile_seconds"),
                                  "regional": reg_m.get("total_seconds"),
                                  "regional_per_region": {n: e["compile_seconds"] for n, e in
                                                          reg_m["regions"].items()}}}
    with torch.no_grad():
        whole_pkg = torch._inductor.aoti_load_package(os.path.join(whole_dir, "model.pt2"))
        whole_pkg.load_constants({n: state[n] for n in whole_m["constants"]},
                                 check_full_update=True, user_managed=True)
        rs = R.regions(module, bucket, C.activation_dtype(args.precision),
                       C._input_shapes(cfg, "transformer", args.precision, bucket))
        calls = R.load_regions(reg_dir, reg_m)
        eager_ms, eager = timed(lambda: module(*ex)[0], max(2, args.iters // 4), device)
        whole_ms, whole = timed(lambda: whole_pkg(*ex)[0], args.iters, device)
        reg_ms, reg = timed(lambda: R.run_regional(calls, rs, state, ex), args.iters, device)
        whole_g_ms, whole_g = graphed(lambda: whole_pkg(*ex)[0], args.iters, device)
        reg_g_ms, reg_g = graphed(lambda: R.run_regional(calls, rs, state, ex), args.iters, device)

    def err(a, b):
        return (a.float() - b.float()).abs().max().item()
    result.update({
        "step_ms": {"eager": round(eager_ms, 3), "whole": round(whole_ms, 3),
                    "regional": round(reg_ms, 3),
                    "whole_cuda_graph": whole_g_ms and round(whole_g_ms, 3),
                    "regional_cuda_graph": reg_g_ms and round(reg_g_ms, 3)},
        "regional_over_whole": round(reg_ms / whole_ms, 4),
        "byte_identical": bool(torch.equal(whole, reg)),
        "max_abs_diff": {"regional_vs_whole": err(reg, whole), "whole_vs_eager": err(whole, eager),
                         "regional_vs_eager": err(reg, eager)},
    })
    if whole_g_ms is None:
        result["whole_cuda_graph_error"] = whole_g
    if reg_g_ms is None:
        result["regional_cuda_graph_error"] = reg_g
    if whole_g_ms and reg_g_ms:
        result["regional_over_whole_cuda_graph"] = round(reg_g_ms / whole_g_ms, 4)
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
