"""Tables the children recorded by sitecustomize.py (beside this file):

    python bench/gpu/trace_children/summary.py DIR [--json OUT]

Groups the waited-for children by what they ran (the program's name and, for compilers and
Python, the first telling argument), with count, total and largest seconds and the parent
processes' count; then the children never waited for (started only). Prints the table; --json
also writes it."""
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir")
    p.add_argument("--json")
    args = p.parse_args()
    ended, started = {}, {}
    for path in glob.glob(os.path.join(args.dir, "children-*.jsonl")):
        with open(path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:
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
    if args.json:
        out = {"waited": [{"child": n, "count": g["count"], "seconds": round(g["seconds"], 3),
                           "max_s": round(g["max_s"], 3), "parents": len(g["parents"]),
                           "example": g["example"]} for n, g in rows],
               "not_waited": dict(never)}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
