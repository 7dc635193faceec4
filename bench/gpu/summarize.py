"""Collects what bench/gpu/run.sh measured in one run into OUT/bench.json and prints the table.

    python3 bench/gpu/summarize.py OUT      (OUT: run.sh's working output folder)

Every figure comes from a file of that run; a missing file leaves its row out (and says so).
Targets are issue 4's (H100 80GB, 1024x1024): kiln fp8 <= 75 ms/step, kiln bf16 <= 120 ms/step,
28 steps end to end <= 2.5 s in fp8, cold start from the shared store <= 2 s beyond reading the
weights, weight read >= 2 GB/s.
"""
from __future__ import annotations

import glob
import json
import os
import statistics
import sys

TARGETS = {"kiln fp8 ms/step": 75.0, "kiln bf16 ms/step": 120.0, "fp8 28 steps e2e s": 2.5,
           "cold start beyond weights s": 2.0, "weight read GB/s": 2.0}


def load(out: str, name: str):
    path = os.path.join(out, name)
    try:
        with open(path) as f:
            text = f.read().strip()
        if not name.endswith(".json"):
            return text
        try:
            return json.loads(text)
        except ValueError:
            return json.loads(text.splitlines()[-1])  # a log whose last line is the object
    except (OSError, ValueError, IndexError):
        return None


def fmt(v, digits=1):
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def kiln_rows(kb: dict, prec: str, label: str) -> list[dict]:
    """Per-step rows of one kiln-bench report: the plain calls (with their profile) and the
    CUDA-graph replays; the error is the one against the eager bf16 reference."""
    err = next((v for k, v in (kb.get("rel_err") or {}).items() if "ref-eager-bf16" in k), None)
    rows = []
    for key, suffix in (("step_ms_plain", ""), ("step_ms_graph", " + CUDA graph")):
        rows.append({"variant": f"{label}{suffix} {prec}", "precision": prec,
                     "ms": kb[key]["median"], "tflops": kb[key].get("tflops"), "err_bf16": err,
                     "peak_gb": kb.get("peak_gpu_bytes", 0) / 1e9,
                     "profile": (kb.get("profile_plain") or {}).get("ms_per_call_by_class")
                     if key == "step_ms_plain" else None})
    return rows


def main(out: str) -> int:
    missing: list[str] = []
    report: dict = {"files": sorted(os.path.basename(p) for p in glob.glob(f"{out}/*.json"))}
    gpu = load(out, "logs/gpu.txt")
    base = load(out, "baselines.json")
    report["gpu"] = gpu
    if base:
        report.update({k: base.get(k) for k in ("torch", "cuda", "bucket", "flop_per_step",
                                                "matmul_tflops", "attention_kernels")})
    flop = (base or {}).get("flop_per_step", {})
    peaks = (base or {}).get("matmul_tflops", {})
    floors = {}
    if flop and peaks:
        floors["bf16"] = flop["total"] / (peaks["bf16"] * 1e12) * 1e3
        floors["fp8"] = (flop["linear"] / (peaks["fp8_rowwise"] * 1e12)
                         + flop["attention"] / (peaks["bf16"] * 1e12)) * 1e3
    report["floor_ms"] = floors

    # Per-step table.
    rows = []
    runs = (base or {}).get("runs", {})
    for prec in ("bf16", "fp8"):
        for mode, label in (("eager", "eager (PyTorch)"), ("compile", "torch.compile regional")):
            r = runs.get(f"{mode} {prec}")
            if r is None:
                missing.append(f"{mode} {prec}")
                continue
            rows.append({"variant": f"{label} {prec}", "precision": prec,
                         "ms": r["step_ms"]["median"], "tflops": r["tflops"],
                         "err_bf16": r.get("rel_err_vs_eager_bf16"),
                         "peak_gb": r["peak_gpu_bytes"] / 1e9,
                         "profile": (r.get("profile") or {}).get("ms_per_call_by_class")})
        for name, label in (("kiln-bench", "kiln AOTI"), ("kiln-bench-autotune", "kiln AOTI autotuned")):
            kb = load(out, f"{name}-{prec}.json")
            if kb is None:
                if name == "kiln-bench":  # autotune runs only on request
                    missing.append(f"kiln-bench {prec}")
                continue
            rows += kiln_rows(kb, prec, label)
            report[f"{name.replace('-', '_')}_{prec}"] = kb
    report["per_step"] = rows

    # End to end and cold start.
    e2e, cold = {}, {}
    for prec in ("bf16", "fp8"):
        j = load(out, f"e2e-{prec}.json")
        if j:
            s = j["seconds"]
            prof = j.get("denoise_profile", {})
            e2e[prec] = {"text_encoding_s": s["text_encoding"], "denoise_s": s["denoise"],
                         "decode_s": s["decode"],
                         "denoise_plus_decode_s": s["denoise"] + s["decode"],
                         "all_three_s": s["text_encoding"] + s["denoise"] + s["decode"],
                         "step_ms_median": statistics.median(prof["step_ms"])
                         if prof.get("step_ms") else None,
                         "gpu_idle_between_steps": prof.get("idle_fraction"),
                         "cuda_graph": prof.get("cuda_graph"),
                         "sync_checked": prof.get("sync_checked"),
                         "wall_s": float(load(out, f"e2e-{prec}.wall") or 0)}
        else:
            missing.append(f"e2e {prec}")
        for kind in ("compiled", "shared", "sharedwarm"):
            j = load(out, f"cold-{kind}-{prec}.json")
            if not j:
                missing.append(f"cold-{kind} {prec}")
                continue
            s = j["seconds"]
            wall = float(load(out, f"cold-{kind}-{prec}.wall") or 0)
            gb = j.get("weight_bytes", 0) / 1e9
            cold[f"{kind} {prec}"] = {
                "wall_s": wall, "compile_s": s["compile"], "fetch_s": s["fetch"],
                "weights_s": s["weights"], "weight_gb": gb,
                "weight_gb_per_s": gb / s["weights"] if s["weights"] else None,
                "beyond_weights_s": wall - s["weights"],
                # what is neither reading weights nor generating (process and CUDA start,
                # package fetch and load, graph capture, PNG): the cold-start overhead
                "overhead_s": wall - s["weights"] - s["compile"] - s["text_encoding"]
                              - s["denoise"] - s["decode"],
                "generate_s": s["text_encoding"] + s["denoise"] + s["decode"],
                "package_load_s": s["package_load"], "process": j.get("process"),
                "graph_capture_s": s.get("graph_capture"), "packages": j.get("packages"),
                "page_cache_dropped": load(out, f"page-cache-dropped-{prec}") == "1"
                if kind == "shared" else False}
    for c in ("empty", "warm"):
        j = load(out, f"torch-compile-cold-{c}.json")
        if j:
            cold[f"torch.compile fresh process, {c} Inductor cache"] = j
        else:
            missing.append(f"torch.compile cold {c}")
    tiny = load(out, "tiny-graph.json")
    report["disk_read"] = load(out, "disk-read.json")
    buckets = {}
    for path in sorted(glob.glob(f"{out}/bucket-*.json")):
        name = os.path.basename(path)[len("bucket-"):-len(".json")]
        j = load(out, os.path.basename(path))
        if not j:
            continue
        prof = j.get("denoise_profile", {})
        buckets[name] = {"compile_s": j["seconds"]["compile"], "denoise_s": j["seconds"]["denoise"],
                         "step_ms_median": statistics.median(prof["step_ms"])
                         if prof.get("step_ms") else None,
                         "idle_fraction": prof.get("idle_fraction"),
                         "cuda_graph": prof.get("cuda_graph"), "packages": j.get("packages")}
    report["buckets"] = buckets
    report.update({"end_to_end_28_steps": e2e, "cold_start": cold, "tiny_cuda": tiny,
                   "missing": missing})

    # Targets.
    by = {r["variant"]: r for r in rows}
    best = {p: min((r["ms"] for r in rows if r["variant"].startswith("kiln") and
                    r["precision"] == p), default=None) for p in ("bf16", "fp8")}
    shared = [v for k, v in cold.items() if k.startswith("shared")]
    from_disk = [v for v in shared if v.get("page_cache_dropped")]
    checks = {
        "kiln fp8 ms/step": best["fp8"], "kiln bf16 ms/step": best["bf16"],
        "fp8 28 steps e2e s": (e2e.get("fp8") or {}).get("all_three_s"),
        "cold start beyond weights s": max((v["overhead_s"] for v in shared), default=None),
        "weight read GB/s": min((v["weight_gb_per_s"] or 0 for v in from_disk), default=None),
    }
    report["targets"] = {k: {"measured": v, "target": TARGETS[k],
                             "met": None if v is None else
                             (v >= TARGETS[k] if k.endswith("GB/s") else v <= TARGETS[k])}
                         for k, v in checks.items()}
    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump(report, f, indent=1)

    # The table.
    print(f"GPU: {gpu}   torch {report.get('torch')}   bucket {report.get('bucket')}")
    if peaks:
        print(f"measured matmul 8192^3: bf16 {peaks['bf16']} TFLOP/s, fp8 row-wise "
              f"{peaks['fp8_rowwise']}, fp8 per-tensor {peaks['fp8_tensorwise']}; one step "
              f"{flop['total'] / 1e12:.1f} TFLOP; floor bf16 {floors['bf16']:.1f} ms, "
              f"fp8 {floors['fp8']:.1f} ms")
    print(f"\n{'per step (one transformer call)':42} {'ms':>7} {'TFLOP/s':>8} {'floor%':>7} "
          f"{'err vs eager bf16':>18} {'peak GB':>8}")
    for r in rows:
        fl = floors.get(r["precision"])
        print(f"{r['variant']:42} {r['ms']:7.1f} {fmt(r['tflops']):>8} "
              f"{(fl / r['ms'] * 100 if fl else 0):6.0f}% {fmt(r['err_bf16'], 4):>18} "
              f"{r['peak_gb']:8.1f}")
    print("\nGPU ms per call by kernel class (profiler, plain calls):")
    for r in rows:
        if r.get("profile"):
            print(f"  {r['variant']:40} " + ", ".join(f"{k} {v:.1f}" for k, v in
                                                       sorted(r["profile"].items())))
    print("\n28 steps end to end (fresh process, packages local):")
    for p, e in e2e.items():
        print(f"  {p}: text {e['text_encoding_s']:.2f} s + denoise {e['denoise_s']:.2f} s + "
              f"decode {e['decode_s']:.2f} s = {e['all_three_s']:.2f} s; step median "
              f"{fmt(e['step_ms_median'])} ms; GPU idle between steps "
              f"{fmt((e['gpu_idle_between_steps'] or 0) * 100, 3)}%; graph {e['cuda_graph']}; "
              f"sync check {e['sync_checked']}")
    print("\ncold start (process start to image written, 28 steps):")
    for k, v in cold.items():
        if k.startswith("torch.compile"):
            print(f"  {k}: first transformer output {v.get('first_output_s')} s after process "
                  f"start (compile + first call {v.get('compile_and_first_call_s')} s)")
        else:
            print(f"  kiln {k}: {v['wall_s']:.1f} s wall; compile {v['compile_s']:.1f} s, "
                  f"fetch {v['fetch_s']:.2f} s, weights {v['weights_s']:.2f} s for "
                  f"{v['weight_gb']:.1f} GB ({fmt(v['weight_gb_per_s'])} GB/s"
                  f"{', page cache dropped' if v.get('page_cache_dropped') else ''}), "
                  f"generating {v['generate_s']:.2f} s, overhead beyond weights and "
                  f"generating {v['overhead_s']:.2f} s")
    if buckets:
        print("\nother buckets (bf16, 28 steps):")
        for k, v in buckets.items():
            print(f"  {k:28} compile {v['compile_s']:6.1f} s, step median "
                  f"{fmt(v['step_ms_median'])} ms, GPU idle between steps "
                  f"{fmt((v['idle_fraction'] or 0) * 100, 3)}%, graph {v['cuda_graph']}")
    if report.get("disk_read"):
        print(f"\ndisk read ceiling (page cache dropped): {report['disk_read']}")
    print("\ntargets:")
    for k, v in report["targets"].items():
        state = "-" if v["met"] is None else ("met" if v["met"] else "MISSED")
        print(f"  {k:30} measured {fmt(v['measured'], 2):>8}  target {v['target']:>5}  {state}")
    if missing:
        print(f"\nnot measured in this run: {', '.join(missing)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
