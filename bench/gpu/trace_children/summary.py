"""Tables the children recorded by sitecustomize.py (beside this file):

    python bench/gpu/trace_children/summary.py DIR [--json OUT]

Groups the waited-for children by what they ran (the program's name and, for compilers and
Python, the first telling argument), with count, total and largest seconds and the parent
processes' count; then the children never waited for (started only). Where the processes sampled
their own stacks (KILN_TRACE_SAMPLE, sitecustomize.py), each sampled process's timeline follows:
runs of samples with the same place (the innermost kiln frame and the innermost frame, or the
innermost `import`), one line per run of at least --min-run seconds, and the places that took
most samples. Prints the tables; --json also writes them."""
import argparse
import collections
import glob
import json
import os
import sys


def label(argv: list) -> str:
    if not argv:
        return "?"
    prog = os.path.basename(argv[0])
    rest = argv[1:]
    if prog.startswith("python") and rest:
        # `python -m module` or `python script.py`
        if rest[0] == "-m" and len(rest) > 1:
            return f"{prog} -m {rest[1]}"
        return f"{prog} {os.path.basename(rest[0])}"
    outputs = [a for a in rest if a.endswith((".so", ".o", ".cubin", ".fatbin", ".ptx"))]
    sources = [a for a in rest if a.endswith((".cpp", ".cc", ".c", ".ptx", ".cu", ".s"))]
    kind = ""
    if sources:
        kind = os.path.splitext(sources[0])[1]
    if outputs:
        kind += "->" + os.path.splitext(outputs[-1])[1]
    if "-c" in rest:
        kind += " -c"
    return f"{prog} {kind}".strip()


def place(stack: list) -> str:
    """What a sampled stack (innermost first) was doing, in a few words."""
    if len(stack) == 1 and stack[0].startswith("("):
        return stack[0]
    # <module> frames inside the outermost one (the script or `-m` module itself) are imports;
    # the outermost of them names what was being imported
    imports = [f for f in stack if f.endswith(":<module>")][:-1]
    kiln = next((f for f in stack if f.startswith("kiln")), None)
    # a wait (a child, a lock, a pool) is named with the frame that waits
    waits = ("subprocess", "filelock", "threading", "selectors", "<frozen", "concurrent",
             "multiprocessing", "queue")
    inner = stack[0] if stack else "?"
    if inner.startswith(waits):
        caller = next((f for f in stack if not f.startswith(waits)), None)
        inner = f"{inner} < {caller}" if caller else inner
    if imports:
        return f"import {imports[-1].rsplit(':', 1)[0]} (in {kiln or '-'})"
    return f"{kiln or '-'} | {inner}"


def timelines(dir_: str, min_run: float) -> list:
    procs = collections.defaultdict(lambda: {"argv": None, "samples": []})
    for path in glob.glob(os.path.join(dir_, "children-*.jsonl")):
        with open(path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                if r.get("event") == "samples":
                    procs[r["pid"]]["argv"] = r["argv"]
                    procs[r["pid"]]["interval"] = r["interval"]
                    procs[r["pid"]]["samples"] += r["samples"]
    out = []
    for pid, p in sorted(procs.items()):
        samples = sorted(p["samples"], key=lambda s: s[0])
        if not samples:
            continue
        t0 = samples[0][0]
        runs = []
        for t, stack in samples:
            where = place(stack)
            if runs and runs[-1]["place"] == where:
                runs[-1]["end"] = t
            else:
                runs.append({"place": where, "start": t, "end": t})
        counts = collections.Counter(place(s) for _, s in samples)
        out.append({"pid": pid, "argv": " ".join(p["argv"] or [])[:200],
                    "seconds": round(samples[-1][0] - t0, 2), "interval": p["interval"],
                    "runs": [{"from_s": round(r["start"] - t0, 2), "to_s": round(r["end"] - t0, 2),
                              "place": r["place"]} for r in runs
                             if r["end"] - r["start"] + p["interval"] >= min_run],
                    "top": [{"place": k, "seconds": round(n * p["interval"], 2)}
                            for k, n in counts.most_common(12)]})
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir")
    p.add_argument("--json")
    p.add_argument("--min-run", type=float, default=1.0)
    p.add_argument("--match", default="kiln",
                   help="print the timelines of sampled processes whose argv holds this (all "
                        "go to --json)")
    args = p.parse_args()
    ended, started = {}, {}
    for path in glob.glob(os.path.join(args.dir, "children-*.jsonl")):
        with open(path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                if r.get("event") not in ("start", "end"):
                    continue
                key = (r["parent"], r["pid"])
                (ended if r["event"] == "end" else started)[key] = r
    groups = collections.defaultdict(lambda: {"count": 0, "seconds": 0.0, "max_s": 0.0,
                                              "parents": set(), "example": None})
    for r in ended.values():
        g = groups[label(r["argv"])]
        g["count"] += 1
        g["seconds"] += r["seconds"]
        g["max_s"] = max(g["max_s"], r["seconds"])
        g["parents"].add(r["parent"])
        g["example"] = g["example"] or " ".join(r["argv"])[:400]
    never = collections.Counter(label(r["argv"]) for k, r in started.items() if k not in ended)
    rows = sorted(groups.items(), key=lambda kv: -kv[1]["seconds"])
    print(f"{'child':48} {'count':>5} {'total s':>8} {'max s':>6} {'parents':>7}")
    for name, g in rows:
        print(f"{name[:48]:48} {g['count']:5d} {g['seconds']:8.1f} {g['max_s']:6.2f} "
              f"{len(g['parents']):7d}")
    for name, n in never.most_common():
        print(f"{name[:48]:48} {n:5d} {'(not waited for)':>23}")
    sampled = timelines(args.dir, args.min_run)
    for proc in sampled:
        if args.match not in proc["argv"]:
            continue
        print(f"\npid {proc['pid']} ({proc['seconds']} s sampled every {proc['interval']} s): "
              f"{proc['argv'][:120]}")
        for r in proc["runs"]:
            print(f"  {r['from_s']:7.2f}-{r['to_s']:7.2f}  {r['place'][:150]}")
        print("  most samples:")
        for r in proc["top"]:
            print(f"  {r['seconds']:7.2f} s  {r['place'][:150]}")
    if args.json:
        out = {"waited": [{"child": n, "count": g["count"], "seconds": round(g["seconds"], 3),
                           "max_s": round(g["max_s"], 3), "parents": len(g["parents"]),
                           "example": g["example"]} for n, g in rows],
               "not_waited": dict(never), "sampled": sampled}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
