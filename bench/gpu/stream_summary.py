"""Summarizes bench/gpu/stream.sh's output directory: images per hour over the stream against
3600 / (denoise + decode) of one warm kiln-run job, GPU utilization over the stream from the
node's NVML metrics (and nvidia-smi), images per device-second from the node's counters.

    python3 bench/gpu/stream_summary.py OUT N

Writes OUT/summary.json and prints a table.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def job_info(path: Path) -> dict:
    j = json.loads(path.read_text())
    return j.get("job", j)


def samples(path: Path, name: str) -> list[tuple[float, float]]:
    """(timestamp, value) of every scraped sample of metric `name` (any labels)."""
    out = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        metric = parts[1].split("{")[0]
        if metric == name:
            out.append((float(parts[0]), float(parts[-1])))
    return out


def counter_delta(path: Path, name: str, t0: float, t1: float) -> float | None:
    """Increase of counter `name` (summed over labels) between the samples nearest t0 and t1."""
    by_ts: dict[float, float] = {}
    for ts, v in samples(path, name):
        by_ts[ts] = by_ts.get(ts, 0.0) + v
    if not by_ts:
        return None
    times = sorted(by_ts)
    before = [t for t in times if t <= t0] or times[:1]
    after = [t for t in times if t >= t1] or times[-1:]
    return by_ts[after[0]] - by_ts[before[-1]]


def main() -> None:
    out = Path(sys.argv[1])
    n = int(sys.argv[2])
    run = json.loads((out / "kiln-run-2.json").read_text())
    seconds = run.get("seconds", {})
    per_image = float(seconds.get("denoise", 0)) + float(seconds.get("decode", 0))
    bound = 3600 / per_image if per_image > 0 else float("nan")

    start = float((out / "stream.start").read_text())
    ends, failed = [], []
    for i in range(1, n + 1):
        p = out / f"s{i}.json"
        try:
            info = job_info(p)
        except (OSError, ValueError):
            failed.append(f"s{i}")
            continue
        if info.get("state") != "SUCCEEDED":
            failed.append(f"s{i}")
            continue
        ends.append(info["finished_unix_ms"] / 1000.0)
    ends.sort()
    steady = (len(ends) - 1) * 3600 / (ends[-1] - ends[0]) if len(ends) > 1 else float("nan")
    overall = len(ends) * 3600 / (ends[-1] - start) if ends else float("nan")

    util = [v for ts, v in samples(out / "metrics-samples.txt", "kiln_gpu_utilization_ratio")
            if ends and ends[0] <= ts <= ends[-1]]
    smi = []
    smi_path = out / "nvidia-smi.csv"
    if smi_path.exists():
        # nvidia-smi timestamps are local wall-clock strings; the stream's window is the middle
        # of the file's samples between its first and last busy sample.
        for line in smi_path.read_text().splitlines():
            cols = [c.strip() for c in line.split(",")]
            if len(cols) >= 2 and cols[1].replace(".", "", 1).isdigit():
                smi.append(float(cols[1]) / 100)
    images = counter_delta(out / "metrics-samples.txt", "kiln_node_images_total",
                           ends[0] if ends else start, ends[-1] if ends else start)
    device_s = counter_delta(out / "metrics-samples.txt", "kiln_node_device_seconds_total",
                             ends[0] if ends else start, ends[-1] if ends else start)

    summary = {
        "jobs": n,
        "succeeded": len(ends),
        "failed": failed,
        "kiln_run_denoise_plus_decode_s": per_image,
        "bound_images_per_hour": bound,
        "images_per_hour_steady": steady,
        "images_per_hour_from_first_submit": overall,
        "steady_over_bound": steady / bound if bound == bound and bound > 0 else None,
        "gpu_util_mean": sum(util) / len(util) if util else None,
        "gpu_util_samples": len(util),
        "gpu_util_share_below_0.97": (sum(1 for u in util if u < 0.97) / len(util)) if util else None,
        "nvidia_smi_util_mean_all_samples": sum(smi) / len(smi) if smi else None,
        "images_per_device_second": (images / device_s) if images and device_s else None,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    rows = [
        ("jobs succeeded", f"{len(ends)} of {n}" + (f" (failed: {' '.join(failed)})" if failed else "")),
        ("kiln-run denoise + decode", f"{per_image:.3f} s"),
        ("bound 3600/(denoise+decode)", f"{bound:.1f} images/h"),
        ("stream, steady ((N-1)/(last-first end))", f"{steady:.1f} images/h"),
        ("stream, from first submit", f"{overall:.1f} images/h"),
        ("steady / bound", f"{summary['steady_over_bound']:.3f}" if summary["steady_over_bound"] else "-"),
        ("GPU util (NVML, node metric) mean", f"{summary['gpu_util_mean']:.3f} over {len(util)} samples"
         if util else "- (no samples: cpu node or no NVML)"),
        ("images per device-second", f"{summary['images_per_device_second']:.4f}"
         if summary["images_per_device_second"] else "-"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
