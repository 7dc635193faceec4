"""Summarizes bench/gpu/cluster.sh's output directory: every job's timings, kiln-run's, and the
nodes' GPU telemetry while warm jobs ran. Writes OUT/summary.json, prints the table."""
import glob
import json
import os
import re
import statistics
import sys

out = sys.argv[1]


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


jobs = []
for wall_path in sorted(glob.glob(os.path.join(out, "*.wall"))):
    name = os.path.basename(wall_path)[:-5]
    if name.startswith("kiln-run"):
        continue
    wall = load(wall_path) or {}
    job = load(os.path.join(out, name + ".json")) or {}
    cs = job.get("cold_start", {})
    jobs.append({
        "name": name, "rc": wall.get("rc"), "start": wall.get("start"), "end": wall.get("end"),
        "client_s": round(wall["end"] - wall["start"], 3) if "end" in wall else None,
        "state": job.get("state"), "node": job.get("node_id"),
        "precision": job.get("spec", {}).get("precision"),
        "queue_s": job.get("queue_seconds"), "run_s": job.get("run_seconds"),
        "cold_total_s": cs.get("total"), "compile_s": cs.get("compile"),
        "weights_s": cs.get("weights"), "packages": job.get("packages"),
    })

runs = {}
for p in ("bf16", "fp8", "fp32"):
    j = load(os.path.join(out, f"kiln-run-{p}.json"))
    w = load(os.path.join(out, f"kiln-run-{p}.wall")) or {}
    if j:
        runs[p] = {"wall_s": w.get("wall_s"), "seconds": j.get("seconds"),
                   "packages": j.get("packages")}

# Telemetry samples: "TS URL NAME{LABELS} VALUE".
line_re = re.compile(r"^(\S+) (\S+) ([a-z_]+)(\{[^}]*\})? (\S+)$")
samples = []
path = os.path.join(out, "metrics-samples.txt")
if os.path.exists(path):
    for line in open(path):
        m = line_re.match(line.strip())
        if m:
            samples.append((float(m[1]), m[2], m[3], m[4] or "", float(m[5])))

warm = [j for j in jobs if j["name"].startswith("warm") and j["rc"] == 0]


def in_denoise(ts):
    # A warm job's denoise fills its run but for ~0.5 s of text encoding at the start and
    # ~0.4 s of decode + PNG at the end (the node's log has the exact split).
    return any(j["start"] + 1.0 <= ts <= j["end"] - 0.6 for j in warm)


telemetry = {}
for metric in ("kiln_gpu_utilization_ratio", "kiln_gpu_memory_utilization_ratio",
               "kiln_gpu_memory_used_bytes", "kiln_gpu_memory_total_bytes", "kiln_gpu_power_watts",
               "kiln_gpu_temperature_celsius", "kiln_gpu_sm_clock_hertz"):
    during = [v for ts, _, name, _, v in samples if name == metric and in_denoise(ts)]
    idle = [v for ts, _, name, _, v in samples if name == metric and not in_denoise(ts)]
    if during:
        telemetry[metric] = {"denoising": {"n": len(during), "min": min(during),
                                           "median": statistics.median(during), "max": max(during)},
                             "otherwise_median": statistics.median(idle) if idle else None}

summary = {"jobs": jobs, "kiln_run": runs, "telemetry": telemetry, "samples": len(samples)}
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)

print("flux-dev, `kiln up --nodes 2` (both on GPU 0) + `kiln generate`; see cluster.log for the sizes")
print(f"{'job':<14}{'prec':<6}{'rc':>3}{'node':>8}{'client s':>10}{'queue s':>9}{'run s':>8}"
      f"{'cold s':>8}{'compile s':>10}  packages")
for j in jobs:
    pk = ",".join(sorted(set((j["packages"] or {}).values())))
    f = lambda v: "-" if v is None else f"{v:.2f}"
    print(f"{j['name']:<14}{j['precision'] or '-':<6}{j['rc']:>3}{j['node'] or '-':>8}"
          f"{f(j['client_s']):>10}{f(j['queue_s']):>9}{f(j['run_s']):>8}{f(j['cold_total_s']):>8}"
          f"{f(j['compile_s']):>10}  {pk}")
for p, r in runs.items():
    s = r["seconds"] or {}
    print(f"kiln-run {p} (fresh process, packages from the shared store): wall {r['wall_s']:.2f} s; "
          + ", ".join(f"{k} {v:.2f}" for k, v in s.items() if isinstance(v, (int, float))))
for p in ("bf16", "fp8", "fp32"):
    w = [j for j in warm if j["precision"] == p]
    if w and p in runs:
        s = runs[p]["seconds"] or {}
        print(f"{p}: warm cluster job run {statistics.median([j['run_s'] for j in w]):.2f} s, "
              f"client {statistics.median([j['client_s'] for j in w]):.2f} s (median of {len(w)}); "
              f"kiln-run generate (text+denoise+decode) "
              f"{sum(s.get(k, 0) for k in ('text_encoding', 'denoise', 'decode')):.2f} s")
print(f"GPU telemetry from the nodes' /metrics ({len(samples)} series samples, every 0.5 s):")
for metric, t in telemetry.items():
    d = t["denoising"]
    print(f"  {metric:<36} denoising: min {d['min']:.4g} median {d['median']:.4g} max {d['max']:.4g}"
          f" (n {d['n']}); otherwise median {t['otherwise_median']}")
