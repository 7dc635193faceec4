"""Summarizes bench/gpu/cluster.sh's output directory: the precompile, every job's timings,
kiln-run's, and the nodes' GPU telemetry while warm jobs denoised (nvidia-smi beside it as a
cross-check). Writes OUT/summary.json, prints the table."""
import csv
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


def read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def med(values):
    return statistics.median(values) if values else None


# Telemetry samples: "TS URL NAME{LABELS} VALUE".
line_re = re.compile(r"^(\S+) (\S+) ([a-zA-Z_:]+)(\{.*\})? (\S+)$")
samples = []
path = os.path.join(out, "metrics-samples.txt")
if os.path.exists(path):
    for line in open(path):
        m = line_re.match(line.strip())
        if m:
            try:
                samples.append((float(m[1]), m[2], m[3], m[4] or "", float(m[5])))
            except ValueError:
                pass


def series_at(url, name, ts, after):
    """The value of `name` (no labels) on node `url` at the last sample before `ts`
    (after=False) or the first one after it (after=True)."""
    best = None
    for t, u, n, _, v in samples:
        if u != url or n != name:
            continue
        if after and t >= ts and (best is None or t < best[0]):
            best = (t, v)
        if not after and t <= ts and (best is None or t > best[0]):
            best = (t, v)
    return best[1] if best else None


cluster = load(os.path.join(out, "cluster.json")) or {}
url_of = {n.get("node_id"): n.get("metrics_url") for n in cluster.get("nodes", [])}

jobs = []
for wall_path in sorted(glob.glob(os.path.join(out, "*.wall"))):
    name = os.path.basename(wall_path)[:-5]
    if not (name.startswith("cold-") or name.startswith("warm-")):
        continue
    wall = load(wall_path) or {}
    job = load(os.path.join(out, name + ".json")) or {}
    cs = job.get("cold_start", {})
    node = job.get("node_id")
    # Host-side mean step time of this job: the node's kiln_node_step_seconds sum and count
    # just before the job began and just after it ended.
    step_ms = None
    url = url_of.get(node)
    if url and "end" in wall:
        s0 = series_at(url, "kiln_node_step_seconds_sum", wall["start"], after=False)
        c0 = series_at(url, "kiln_node_step_seconds_count", wall["start"], after=False)
        s1 = series_at(url, "kiln_node_step_seconds_sum", wall["end"], after=True)
        c1 = series_at(url, "kiln_node_step_seconds_count", wall["end"], after=True)
        if None not in (s0, c0, s1, c1) and c1 > c0:
            step_ms = 1000 * (s1 - s0) / (c1 - c0)
    jobs.append({
        "name": name, "rc": wall.get("rc"), "start": wall.get("start"), "end": wall.get("end"),
        "client_s": round(wall["end"] - wall["start"], 3) if "end" in wall else None,
        "state": job.get("state"), "node": node, "attempts": job.get("attempts"),
        "precision": job.get("spec", {}).get("precision"), "error": job.get("error"),
        "queue_s": job.get("queue_seconds"), "run_s": job.get("run_seconds"),
        "cold_total_s": cs.get("total"), "compile_s": cs.get("compile"),
        "fetch_s": cs.get("fetch"), "package_load_s": cs.get("package_load"),
        "weights_s": cs.get("weights"), "packages": job.get("packages"),
        "host_step_ms": step_ms,
        "page_cache_dropped": read(os.path.join(out, name + ".page-cache-dropped")),
    })

precompile = {}
for p in ("bf16", "fp8", "fp32"):
    w = load(os.path.join(out, f"precompile-{p}.wall"))
    if w:
        j = load(os.path.join(out, f"precompile-{p}.json")) or {}
        precompile[p] = {"rc": w.get("rc"), "wall_s": w.get("wall_s"),
                         "seconds": j.get("seconds"), "packages": j.get("packages")}

runs = {}
for p in ("bf16", "fp8", "fp32"):
    j = load(os.path.join(out, f"kiln-run-{p}.json"))
    w = load(os.path.join(out, f"kiln-run-{p}.wall")) or {}
    if j:
        steps = (j.get("denoise_profile") or {}).get("step_ms") or []
        runs[p] = {"wall_s": w.get("wall_s"), "seconds": j.get("seconds"),
                   "packages": j.get("packages"), "step_ms_median": med(steps),
                   "process": j.get("process")}

warm = [j for j in jobs if j["name"].startswith("warm") and j["rc"] == 0]


def in_denoise(ts):
    # A warm job's denoise fills its run but for ~0.5 s of text encoding at the start and
    # ~0.4 s of decode + PNG at the end (the node's log has the exact split).
    return any(j["start"] + 1.0 <= ts <= j["end"] - 0.6 for j in warm)


GAUGES = ("kiln_gpu_utilization_ratio", "kiln_gpu_memory_utilization_ratio",
          "kiln_gpu_memory_used_bytes", "kiln_gpu_memory_total_bytes", "kiln_gpu_power_watts",
          "kiln_gpu_temperature_celsius", "kiln_gpu_sm_clock_hertz",
          "kiln_mig_memory_used_bytes", "kiln_mig_memory_total_bytes",
          "kiln_mig_sm_utilization_ratio", "kiln_mig_dram_bandwidth_utilization_ratio")
DOCUMENTED = GAUGES + ("kiln_gpu_clocks_event_active", "kiln_gpu_ecc_errors_total",
                       "kiln_gpu_telemetry_samples_total", "kiln_gpu_telemetry_errors_total")


def stats(values):
    return {"n": len(values), "min": min(values), "median": statistics.median(values),
            "max": max(values)}


telemetry = {}
for metric in GAUGES:
    during = [v for ts, _, name, _, v in samples if name == metric and in_denoise(ts)]
    idle = [v for ts, _, name, _, v in samples if name == metric and not in_denoise(ts)]
    if during or idle:
        telemetry[metric] = {"denoising": stats(during) if during else None,
                             "otherwise": stats(idle) if idle else None}

# Which series the nodes exported at all (every sample), and clock-event reasons seen active.
present = sorted({name for _, _, name, _, _ in samples
                  if name.startswith("kiln_gpu_") or name.startswith("kiln_mig_")})
absent = [m for m in DOCUMENTED if m not in present]
events = {}
for ts, _, name, labels, v in samples:
    if name == "kiln_gpu_clocks_event_active" and v > 0:
        reason = re.search(r'reason="([^"]*)"', labels)
        key = reason[1] if reason else labels
        e = events.setdefault(key, {"denoising": 0, "otherwise": 0})
        e["denoising" if in_denoise(ts) else "otherwise"] += 1
last = {}
for ts, u, name, labels, v in samples:
    if name in ("kiln_gpu_telemetry_samples_total", "kiln_gpu_telemetry_errors_total",
                "kiln_gpu_ecc_errors_total"):
        last[f"{name}{labels} {u}"] = v

# nvidia-smi beside it: timestamp, util %, mem util %, MiB used, W, MHz, C.
smi = {}
smi_path = os.path.join(out, "nvidia-smi.csv")
if os.path.exists(smi_path):
    import datetime
    cols = ("utilization_gpu_pct", "utilization_memory_pct", "memory_used_mib", "power_w",
            "sm_clock_mhz", "temperature_c")
    rows = {c: [] for c in cols}
    for row in csv.reader(open(smi_path)):
        try:
            t = datetime.datetime.strptime(row[0].strip(), "%Y/%m/%d %H:%M:%S.%f")
            ts = t.replace(tzinfo=datetime.timezone.utc).timestamp()
            values = [float(x) for x in row[1:7]]
        except (ValueError, IndexError):
            continue
        if in_denoise(ts):
            for c, v in zip(cols, values):
                rows[c].append(v)
    smi = {c: stats(v) for c, v in rows.items() if v}

summary = {"up": load(os.path.join(out, "up.wall")), "precompile": precompile, "jobs": jobs,
           "kiln_run": runs, "telemetry": telemetry, "series_present": present,
           "series_absent": absent, "clock_events_active_samples": events,
           "telemetry_counters_last": last, "nvidia_smi_denoising": smi,
           "samples": len(samples)}
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)

f2 = lambda v: "-" if v is None else f"{v:.2f}"
print("flux-dev, `kiln up --nodes 2` (both on GPU 0) + `kiln generate`; cluster.log has the sizes")
for p, r in precompile.items():
    s = r["seconds"] or {}
    print(f"precompile {p} (kiln-run, all precisions at once, into the shared store): rc {r['rc']}, "
          f"wall {f2(r['wall_s'])} s, compile {f2(s.get('compile'))} s; packages "
          + ",".join(sorted(set((r["packages"] or {}).values()))))
if summary["up"]:
    print(f"kiln up (coordinator + 2 nodes READY): {f2(summary['up'].get('up_s'))} s")
print(f"{'job':<12}{'prec':<5}{'rc':>3}{'node':>7}{'client s':>9}{'queue':>7}{'run s':>7}"
      f"{'cold s':>7}{'fetch':>7}{'weights':>8}{'pkgload':>8}{'compile':>8}{'step ms':>8}  packages")
for j in jobs:
    pk = ",".join(sorted(set((j["packages"] or {}).values())))
    if j["page_cache_dropped"] is not None:
        pk += f" (page cache dropped: {j['page_cache_dropped']})"
    print(f"{j['name']:<12}{j['precision'] or '-':<5}{j['rc']:>3}{j['node'] or '-':>7}"
          f"{f2(j['client_s']):>9}{f2(j['queue_s']):>7}{f2(j['run_s']):>7}{f2(j['cold_total_s']):>7}"
          f"{f2(j['fetch_s']):>7}{f2(j['weights_s']):>8}{f2(j['package_load_s']):>8}"
          f"{f2(j['compile_s']):>8}{f2(j['host_step_ms']):>8}  {pk}")
print("(step ms: the node's kiln_node_step_seconds over the job, host side)")
for p, r in runs.items():
    s = r["seconds"] or {}
    print(f"kiln-run {p} (fresh process, packages from the shared store, page cache warm): wall "
          f"{f2(r['wall_s'])} s; step median {f2(r['step_ms_median'])} ms; "
          + ", ".join(f"{k} {v:.2f}" for k, v in s.items() if isinstance(v, (int, float))))
for p in ("bf16", "fp8", "fp32"):
    w = [j for j in warm if j["precision"] == p]
    if w:
        s = (runs.get(p) or {}).get("seconds") or {}
        gen = sum(s.get(k, 0) for k in ("text_encoding", "denoise", "decode"))
        steps = [j["host_step_ms"] for j in w if j["host_step_ms"] is not None]
        print(f"{p}: warm cluster job: run {med([j['run_s'] for j in w]):.2f} s, client "
              f"{med([j['client_s'] for j in w]):.2f} s, host step {f2(med(steps))} ms "
              f"(median of {len(w)}); kiln-run generate (text+denoise+decode) {gen:.2f} s, "
              f"process wall {f2((runs.get(p) or {}).get('wall_s'))} s")
print(f"GPU telemetry from the nodes' /metrics ({len(samples)} series samples, every 0.5 s; "
      "NVML sampled by each node every 1 s; both nodes see GPU 0):")
for metric, t in telemetry.items():
    d, o = t["denoising"], t["otherwise"]
    dtext = (f"denoising: min {d['min']:.4g} median {d['median']:.4g} max {d['max']:.4g} "
             f"(n {d['n']})") if d else "denoising: -"
    print(f"  {metric:<36} {dtext}; otherwise median {o['median'] if o else '-'}")
print(f"  series present: {', '.join(present) or 'none'}")
print(f"  documented but absent: {', '.join(absent) or 'none'}")
print(f"  clock event reasons active (samples denoising/otherwise): {events or 'none'}")
for k, v in last.items():
    print(f"  last {k}: {v:g}")
if smi:
    print("nvidia-smi during the same denoise windows (every 0.5 s): "
          + ", ".join(f"{c} median {s['median']:g} (max {s['max']:g}, n {s['n']})"
                      for c, s in smi.items()))
