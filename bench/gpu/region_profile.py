"""Where a regional package's compile on a miss goes (issue 13: the flux-dev transformer's
regional set compiles in 104 s on an H100 against a target of <= 30 s, and the one-linear tail
region takes nearly as long as the double block).

    python bench/gpu/region_profile.py --model M --precision bf16 --height 1024 --width 1024 \
        --regions tail,double --variants default,O0 --out DIR

Each (region, variant) compiles in its own child process with an empty Inductor cache, one at a
time, so nothing contends: the child times its phases (torch import and device start, export,
aoti_compile_and_package), runs the compile under cProfile, and writes DIR/<region>-<variant>.json
(phases, Inductor's own timers from torch._dynamo.utils.compile_times, the top functions by
cumulative and by own time). The parent prints one table. Variants: `default` is kiln-compile's
configuration; `O0` also sets aot_inductor.compile_wrapper_opt_level=O0 (the generated wrapper's
C++ optimisation level; Inductor's default is O1); `nofatbin` sets
aot_inductor.emit_multi_arch_kernel=False (one cubin per kernel for the key's sm_XX, no fatbin).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

VARIANTS = {
    "default": {},
    "O0": {"aot_inductor.compile_wrapper_opt_level": "O0"},
    # One cubin for the key's own architecture instead of a fatbin (PTX + SASS) per kernel. Tried
    # because child processes took 36 s of the double block's 66 s compile on the H100
    # (2026-12-06, cProfile: 18 subprocess.check_call); it changed nothing (the same calls, tail
    # 79 s and double 77 s of aoti_compile on a fresh machine): they are not fatbin builds.
    "nofatbin": {"aot_inductor.emit_multi_arch_kernel": False},
}


def child(args) -> int:
    t0 = time.monotonic()
    import cProfile
    import io
    import pstats

    import torch
    from kiln import compile as kc
    from kiln import regional
    device = "cuda" if args.target != "cpu" else "cpu"
    if device == "cuda":
        torch.zeros(1, device="cuda")
    t_import = time.monotonic() - t0
    options = {"layout": "regional"}
    key, _ = kc.make_key(args.model, "transformer", args.precision,
                         {"height": args.height, "width": args.width, "text_len": args.text_len,
                          "batch": 1}, args.target, options)
    configs = kc._inductor_configs(key, key.digest(), kc.component_compile_options(options,
                                                                                   "transformer"))
    configs.update(VARIANTS[args.variant])
    spec = {"model": args.model, "precision": args.precision,
            "bucket": {"batch": 1, "height": args.height, "width": args.width,
                       "text_len": args.text_len},
            "options": options, "device": device, "inductor_configs": configs}
    prof = cProfile.Profile()
    t1 = time.monotonic()
    prof.enable()
    entry = regional.compile_one(spec, args.region, args.out)
    prof.disable()
    wall = time.monotonic() - t1
    tables = {}
    for sort in ("cumulative", "tottime"):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats(sort).print_stats(30)
        tables[sort] = s.getvalue()
    try:
        inductor_timers = torch._dynamo.utils.compile_times(repr="str")
    except Exception as e:  # the timers are a debugging aid; their absence is not an error
        inductor_timers = f"unavailable: {e}"
    result = {"region": args.region, "variant": args.variant, "configs_added": VARIANTS[args.variant],
              "import_and_device_s": round(t_import, 3), "compile_one_s": round(wall, 3),
              "export_s": entry["export_seconds"], "aoti_s": entry["compile_seconds"],
              "package_bytes": entry["package"]["bytes"], "inductor_timers": inductor_timers,
              "profile": tables}
    with open(os.path.join(args.out, f"{args.region}-{args.variant}.json"), "w") as f:
        json.dump(result, f, indent=1)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--target", default="cuda:sm_90")
    p.add_argument("--regions", default="tail,double")
    p.add_argument("--variants", default="default,O0")
    p.add_argument("--out", required=True)
    p.add_argument("--region", help=argparse.SUPPRESS)  # child mode
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.region:
        return child(args)
    rows, rc = [], 0
    for region in args.regions.split(","):
        for variant in args.variants.split(","):
            if variant not in VARIANTS:
                print(f"unknown variant {variant!r} (known: {', '.join(VARIANTS)})", file=sys.stderr)
                return 2
            cache = tempfile.mkdtemp(prefix="inductor-empty-")
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
            t0 = time.monotonic()
            proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--region", region,
                                   "--variant", variant], env=env)
            wall = time.monotonic() - t0
            subprocess.run(["rm", "-rf", cache])
            path = os.path.join(args.out, f"{region}-{variant}.json")
            if proc.returncode != 0 or not os.path.exists(path):
                rows.append((region, variant, wall, None))
                rc = 1
                continue
            with open(path) as f:
                rows.append((region, variant, wall, json.load(f)))
    print(f"{'region':8} {'variant':8} {'process s':>9} {'import s':>8} {'export s':>8} "
          f"{'aoti s':>7} {'pkg KB':>7}")
    for region, variant, wall, r in rows:
        if r is None:
            print(f"{region:8} {variant:8} {wall:9.1f}  FAILED")
            continue
        print(f"{region:8} {variant:8} {wall:9.1f} {r['import_and_device_s']:8.1f} "
              f"{r['export_s']:8.1f} {r['aoti_s']:7.1f} {r['package_bytes'] / 1024:7.0f}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
