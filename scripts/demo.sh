#!/usr/bin/env bash
# `make demo`: a local kiln cluster on this machine.
#   1. writes the seeded flux-tiny model (once) and starts a coordinator and two nodes sharing one
#      package cache (`kiln up --nodes 2 --detach`, state in .kiln/cluster);
#   2. generates an image from a prompt: the node compiles each component's package and
#      publishes it to the shared cache;
#   3. adds a node with an empty local disk (`kiln add-node --fresh`), drains the first two so
#      the job lands on it, and runs the same job again: every package comes from the shared
#      cache, nothing compiles;
#   4. prints both cold starts side by side, checks the two PNGs are byte-identical, `kiln down`.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=$(cd "${1:-build}" && pwd)
ROOT=${KILN_DEMO_DIR:-$PWD/.kiln}
MODEL=$ROOT/models/flux-tiny
STATE=$ROOT/cluster
PROMPT=${PROMPT:-"a red fox in fresh snow, watercolor"}
PY=$PWD/.venv/bin/python
export PYTHONPATH=$PWD/pipeline/python${PYTHONPATH:+:$PYTHONPATH}
KILN=$BUILD/bin/kiln
say() { echo "[demo] $*"; }

for exe in kiln kiln-coordinator kiln-node; do
  if [ ! -x "$BUILD/bin/$exe" ]; then
    echo "[demo] ERROR: $BUILD/bin/$exe is not built (run \`make build\`)" >&2
    exit 1
  fi
done

if [ ! -f "$MODEL/model_index.json" ]; then
  say "writing the seeded flux-tiny model to $MODEL"
  "$PY" -m kiln.make_tiny "$MODEL" --seed 0
fi

# A fresh cluster every time, so the first job really compiles.
if [ -f "$STATE/cluster.json" ]; then
  "$KILN" down --state-dir "$STATE" >/dev/null || true
fi
rm -rf "$STATE"
mkdir -p out
rm -f out/demo-1.png out/demo-2.png out/demo-1.json out/demo-2.json

cleanup() {
  status=$?
  if [ $status -ne 0 ]; then
    echo "[demo] failed (exit $status); logs are in $STATE/logs; stopping the cluster" >&2
  fi
  "$KILN" down --state-dir "$STATE" >/dev/null 2>&1 || true
}
trap cleanup EXIT

say "kiln up --nodes 2 --detach (state in $STATE)"
"$KILN" up --nodes 2 --detach --models "flux-tiny=$MODEL" --state-dir "$STATE" 2>&1 |
  sed 's/^/[demo]   /'

JOB=(--prompt "$PROMPT" --model flux-tiny --width 256 --height 256 --steps 8 --seed 42)
say "job 1: kiln generate --prompt \"$PROMPT\" (256x256, 8 steps, seed 42); the first job compiles"
"$KILN" generate "${JOB[@]}" --job-id "demo-1-$$" --out out/demo-1.png --json \
  --state-dir "$STATE" > out/demo-1.json
say "  image: $PWD/out/demo-1.png"

say "kiln add-node --fresh: a third node with an empty local package directory"
"$KILN" add-node --fresh --state-dir "$STATE" 2>&1 | sed 's/^/[demo]   /'
say "kiln drain node-1 node-2: placement prefers warm nodes, so send the next job to node-3"
"$KILN" drain node-1 --state-dir "$STATE" | sed 's/^/[demo]   /'
"$KILN" drain node-2 --state-dir "$STATE" | sed 's/^/[demo]   /'
"$KILN" nodes --state-dir "$STATE" | sed 's/^/[demo]   /'

say "job 2: the same prompt and seed on the fresh node"
"$KILN" generate "${JOB[@]}" --job-id "demo-2-$$" --out out/demo-2.png --json \
  --state-dir "$STATE" > out/demo-2.json
say "  image: $PWD/out/demo-2.png"

"$PY" - out/demo-1.json out/demo-2.json <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
def packages(j):
    counts = {}
    for v in j["packages"].values():
        counts[v] = counts.get(v, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
rows = [("node", a["node_id"], b["node_id"])]
for key, label in (("compile", "compile"), ("fetch", "fetch from shared cache"),
                   ("package_load", "package load"), ("weights", "weights"),
                   ("total", "cold start total")):
    rows.append((label, f"{a['cold_start'][key]:.2f} s", f"{b['cold_start'][key]:.2f} s"))
rows.append(("run (incl. cold start)", f"{a['run_seconds']:.2f} s", f"{b['run_seconds']:.2f} s"))
rows.append(("packages", packages(a), packages(b)))
print("[demo]")
print(f"[demo] {'':26}{'job 1 (first node)':28}job 2 (fresh node)")
for label, x, y in rows:
    print(f"[demo] {label:26}{x:28}{y}")
print("[demo]")
ok = (a["cold_start"]["compile"] > 0 and b["cold_start"]["compile"] == 0
      and set(b["packages"].values()) == {"shared"})
if not ok:
    print("[demo] ERROR: expected job 1 to compile and job 2 to take every package from the "
          "shared cache", file=sys.stderr)
    sys.exit(1)
PY

if cmp -s out/demo-1.png out/demo-2.png; then
  say "both images are byte-identical (same seed, different nodes): out/demo-1.png = out/demo-2.png"
else
  echo "[demo] ERROR: the two images differ" >&2
  exit 1
fi

say "kiln down"
"$KILN" down --state-dir "$STATE" 2>&1 | sed 's/^/[demo]   /'
trap - EXIT
FIRST=$("$PY" -c 'import json; print(json.load(open("out/demo-1.json"))["node_id"])')
say "summary: job 1 compiled every package on $FIRST and published them to the shared cache;"
say "         the fresh node-3 found them all there and compiled nothing; both PNGs are identical."
