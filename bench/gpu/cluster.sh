#!/usr/bin/env bash
# The cluster path on the GPU test host (issues 10 and 11): `kiln up --device cuda` with two nodes
# on GPU 0 serving bf16 and fp8, `kiln generate` of flux-dev (synthetic seeded weights) at
# 1024x1024, 28 steps, every job's timings from `kiln generate --json`; the nodes' /metrics
# scraped every 0.5 s throughout (GPU telemetry while they denoise, one whole page kept from the
# middle of a warm denoise per precision; nvidia-smi sampled beside it as a cross-check); then
# kiln-run in a fresh process on the same packages (from the shared store) for comparison.
# Prints a table last.
#
#   bench/gpu/cluster.sh OUTDIR
#
# PHASES (comma list, default prep,precompile,cluster; SKIP_PREP=1 drops prep):
#   prep        bench/gpu/run.sh's build and weights stages
#   precompile  kiln-run per precision, all at once (4 steps), into the cluster's shared store
#               STATE/shared-cache (the path `kiln up` gives its nodes): the packages compiled
#               on a miss, as a cluster's first node would, bounded by PRECOMPILE_TIMEOUT
#               (default 600 s); a precision whose packages did not compile is left out of the
#               cluster phase
#   cluster     `kiln up` of two fresh nodes (empty local package directories, the shared store
#               kept), then the cold jobs: the first job of each precision, one after the other
#               (COLD_CONCURRENT=1: at once), each on a node that has never run a job, with the
#               page cache dropped first (DROP_CACHES=0: kept; default 0 on cpu): a cold node with a warm shared
#               store; then WARM_JOBS (default 3) warm jobs per precision, GAP s (default 2)
#               between jobs; kiln down; kiln-run
#
# A call of at most 10 minutes cannot hold the build, the compiles and the cluster: run the
# script detached (setsid) on the device and wait for it in two calls back to back (bench/
# README.md shows the commands); the machine stays warm between them, so the script runs on.
# KILN_GPU_WORK (default build-gpu/ in the repository, ignored by git) holds the build, the
# weights and the store: a later run with PHASES=cluster (REUSE=1 implied) reuses them.
set -uo pipefail
DEST=$(mkdir -p "$1" && cd "$1" && pwd)
cd "$(dirname "$0")/../.."
ROOT=$PWD
export KILN_GPU_WORK=${KILN_GPU_WORK:-$ROOT/build-gpu}
WORK=$KILN_GPU_WORK
OUT=$WORK/cluster-out
PRE=$WORK/precompile-out
PHASES=${PHASES:-prep,precompile,cluster}
[ "${SKIP_PREP:-0}" = 1 ] && PHASES=${PHASES//prep,/} && PHASES=${PHASES//prep/}
has() { [[ ",$PHASES," == *",$1,"* ]]; }
rm -rf "$OUT"; mkdir -p "$OUT/logs"
PY=${PYTHON:-python3}
DEPS=$ROOT/.device-deps
export PYTHONPATH=$ROOT/pipeline/python${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
BIN=${BIN:-$WORK/build/bin}
MODEL=${MODEL:-$WORK/flux-dev}
# A dry run of this script on a CPU machine: SKIP_PREP=1 BIN=build/bin MODEL=<flux-tiny>
# DEVICE=cpu SIZE=256 PRECISIONS=fp32 STEPS=4.
DEVICE=${DEVICE:-cuda} SIZE=${SIZE:-1024} STEPS=${STEPS:-28}
PRECISIONS=${PRECISIONS:-bf16 fp8}
STATE=$WORK/cluster
PROMPT="a lighthouse on a cliff at dusk"
WARM_JOBS=${WARM_JOBS:-3}
log() { echo "[cluster $(date +%H:%M:%S)] $*" | tee -a "$OUT/logs/cluster.log"; }
now() { date +%s.%N; }
since() { awk "BEGIN{printf \"%.2f\", $(now) - $1}"; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; }
log "phases: $PHASES; precisions: $PRECISIONS; $DEVICE ${SIZE}x$SIZE, $STEPS steps"
log "host: $(nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null || echo no-gpu); $(nproc) cores"

if has prep; then
  export LD_LIBRARY_PATH=$DEPS/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  export PATH=$DEPS/usr/bin:$PATH
  t0=$(now)
  log "build + weights (bench/gpu/run.sh)"
  BUILD_TARGETS="kiln kiln-coordinator kiln-node kiln-run" CTEST=0 \
    bench/gpu/run.sh "$WORK/prep-dest" build,weights > "$OUT/logs/prep.log" 2>&1
  grep -E "^\[gpu" "$OUT/logs/prep.log" | tee -a "$OUT/logs/cluster.log"
  log "prep took $(since "$t0") s"
  [ -x "$BIN/kiln" ] && [ -x "$BIN/kiln-node" ] || { log "FAILED: build"; tail -40 "$OUT/logs/prep.log"; exit 1; }
fi
[ -x "$BIN/kiln" ] && [ -x "$BIN/kiln-node" ] || { log "FAILED: no build in $BIN"; exit 1; }
# The processes below load the Debian libraries from a private copy, so that a later device
# call, which sends .device-deps/ again, never replaces a library under a running process.
if [ -d "$DEPS" ]; then
  rm -rf "$WORK/deps" && cp -a "$DEPS" "$WORK/deps"
  export LD_LIBRARY_PATH=$WORK/deps/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  export PATH=$WORK/deps/usr/bin:$PATH
fi

if has precompile; then
  [ "${REUSE:-0}" = 1 ] || rm -rf "$STATE"
  rm -rf "$PRE"; mkdir -p "$PRE/logs" "$STATE/shared-cache"
  # Signed with the key `kiln up` then finds in the state dir and gives its nodes (and trusts):
  # unsigned packages are refused by the nodes, quarantined and compiled again (2026-12-06).
  SIGNING_KEY=$STATE/keys/package-signing.key
  [ -f "$SIGNING_KEY" ] || { mkdir -p -m 700 "$STATE/keys" && "$BIN/kiln" signing-key new "$SIGNING_KEY" > /dev/null; } \
    || { log "FAILED: kiln signing-key new"; exit 1; }
  log "precompile: kiln-run per precision at once ($PRECISIONS), packages into $STATE/shared-cache"
  pids=()
  for p in $PRECISIONS; do
    ( t0=$(now)
      rm -rf "$WORK/precompile-$p"
      timeout "${PRECOMPILE_TIMEOUT:-600}" "$BIN/kiln-run" --model "$MODEL" --device "$DEVICE" \
        --prompt "$PROMPT" --width $SIZE --height $SIZE --steps 4 --seed 7 --precision "$p" \
        --package_dir "$WORK/precompile-$p" --shared_dir "$STATE/shared-cache" \
        --signing_key "$SIGNING_KEY" --out "$PRE/logs/precompile-$p.png" --json > "$PRE/precompile-$p.json" 2> "$PRE/logs/precompile-$p.err"
      rc=$?
      echo "{\"rc\": $rc, \"wall_s\": $(since "$t0")}" > "$PRE/precompile-$p.wall"
      rm -rf "$WORK/precompile-$p"
      exit $rc ) &
    pids+=($!)
    sleep 2
  done
  ok=()
  i=0
  for p in $PRECISIONS; do
    wait "${pids[$i]}" && ok+=("$p") || tail -5 "$PRE/logs/precompile-$p.err" | tee -a "$OUT/logs/cluster.log"
    log "precompile $p: $(cat "$PRE/precompile-$p.wall") $(head -c 700 "$PRE/precompile-$p.json")"
    i=$((i + 1))
  done
  echo "${ok[*]}" > "$PRE/precisions"
  du -sh "$STATE/shared-cache" 2>/dev/null | tee -a "$OUT/logs/cluster.log"
fi
if [ -f "$PRE/precisions" ]; then
  PRECISIONS=$(cat "$PRE/precisions")
  cp -r "$PRE"/* "$OUT/" 2>/dev/null
  [ -n "$PRECISIONS" ] || { log "FAILED: no precision compiled"; exit 1; }
fi

if has cluster; then
# Fresh nodes, the shared store and its signing key kept: everything else in STATE goes.
mkdir -p "$STATE"
find "$STATE" -mindepth 1 -maxdepth 1 ! -name shared-cache ! -name keys -exec rm -rf {} +
log "shared store before kiln up: $(ls "$STATE/shared-cache" 2>/dev/null | tr '\n' ' ')"
if [ "$DEVICE" != cpu ] && command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=timestamp,utilization.gpu,utilization.memory,memory.used,power.draw,clocks.sm,temperature.gpu \
    --format=csv,noheader,nounits -lms 500 > "$OUT/nvidia-smi.csv" 2>/dev/null &
  SMI=$!
fi
log "kiln up: 2 nodes on $DEVICE (GPU 0), $PRECISIONS"
t0=$(now)
"$BIN/kiln" up --detach --nodes 2 --device "$DEVICE" --precision "${PRECISIONS// /,}" --models "flux-dev=$MODEL" \
  --state-dir "$STATE" --start-timeout 180 --bin-dir "$BIN" > "$OUT/logs/up.log" 2>&1 \
  || { log "FAILED: kiln up"; cat "$OUT/logs/up.log"; tail -30 "$STATE"/logs/*.log; exit 1; }
echo "{\"up_s\": $(since "$t0")}" > "$OUT/up.wall"
log "cluster up in $(since "$t0") s"
cat "$OUT/logs/up.log"
cp "$STATE/cluster.json" "$OUT/cluster.json"
NODE_URLS=$($PY -c 'import json,sys; print(" ".join(n["metrics_url"] for n in json.load(open(sys.argv[1]))["nodes"]))' "$STATE/cluster.json")
log "node metrics: $NODE_URLS"

# Scraper (Python: the host may have no curl): every 0.5 s, each node's kiln_gpu_*, kiln_mig_*,
# kiln_node_* and kiln_cold_* series (histograms as _sum and _count), with a timestamp.
$PY - "$OUT/metrics-samples.txt" $NODE_URLS <<'EOF_SCRAPER' &
import re, sys, time, urllib.request
out = open(sys.argv[1], "w", buffering=1)
keep = re.compile(r"^kiln_(gpu|mig|node|cold)_")
while True:
    ts = time.time()
    for u in sys.argv[2:]:
        try:
            text = urllib.request.urlopen(u, timeout=1).read().decode()
        except Exception:
            continue
        for line in text.splitlines():
            if keep.match(line) and "_bucket{" not in line:
                out.write(f"{ts:.3f} {u} {line}\n")
    time.sleep(0.5)
EOF_SCRAPER
SCRAPER=$!
page() {  # every node's whole /metrics page
  for u in $NODE_URLS; do
    echo "# $u at $(date +%s.%N)"
    $PY -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())' "$u" 2>/dev/null \
      || echo "# $u did not answer"
  done
}
page > "$OUT/metrics-idle.txt"

generate() {  # name precision [extra]
  local name=$1 p=$2; shift 2
  # GAP s (default 2) first: a job submitted within a heartbeat (1 s) of the last one's end is
  # placed before the coordinator knows what that job left loaded (kiln's placement reads the
  # loaded packages from heartbeats), and may go to a cold node.
  sleep "${GAP:-2}"
  local t0; t0=$(now)
  timeout "${GEN_TIMEOUT:-300}" "$BIN/kiln" generate --state-dir "$STATE" --model flux-dev \
    --prompt "$PROMPT" --width $SIZE --height $SIZE --steps $STEPS --seed 7 --precision "$p" \
    --no-progress --json --out "$OUT/logs/$name.png" "$@" > "$OUT/$name.json" 2> "$OUT/logs/$name.err"
  local rc=$?
  echo "{\"name\": \"$name\", \"rc\": $rc, \"start\": $t0, \"end\": $(now)}" > "$OUT/$name.wall"
  log "$name: rc $rc, $(since "$t0") s: $(head -c 600 "$OUT/$name.json")"
  [ $rc -eq 0 ] || tail -5 "$OUT/logs/$name.err"
}

cold_job() {  # precision
  local dropped=0
  # Default: dropped on cuda only (a CPU dry run on a shared machine leaves its page cache be).
  if [ "${DROP_CACHES:-$([ "$DEVICE" = cpu ] && echo 0 || echo 1)}" = 1 ] && drop_caches; then dropped=1; fi
  echo "$dropped" > "$OUT/cold-$1.page-cache-dropped"
  log "cold: first $1 job on a fresh node, packages in the shared store (page cache dropped: $dropped)"
  GEN_TIMEOUT=${COLD_TIMEOUT:-420} generate "cold-$1" "$1"
}
if [ "${COLD_CONCURRENT:-0}" = 1 ]; then
  cold=()
  for p in $PRECISIONS; do cold_job "$p" & cold+=($!); sleep 1; done
  wait "${cold[@]}"
else
  for p in $PRECISIONS; do cold_job "$p"; done
fi
"$BIN/kiln" nodes --state-dir "$STATE" > "$OUT/logs/nodes-after-cold.txt" 2>&1

for p in $PRECISIONS; do
  for i in $(seq 1 "$WARM_JOBS"); do
    if [ "$i" = 2 ]; then
      # One whole /metrics page of every node, 2.5 s into the job (its denoise).
      ( sleep "$(awk "BEGIN{print ${GAP:-2} + 2.5}")"; page > "$OUT/metrics-during-denoise-$p.txt" ) &
    fi
    generate "warm-$p-$i" "$p"
  done
done
sleep 1
kill $SCRAPER 2>/dev/null
"$BIN/kiln" nodes --state-dir "$STATE" --json > "$OUT/nodes.json" 2>&1
"$BIN/kiln" down --state-dir "$STATE" --timeout 60 > "$OUT/logs/down.log" 2>&1
cp "$STATE"/logs/*.log "$OUT/logs/" 2>/dev/null
grep -hE "ERROR|WARN" "$STATE"/logs/*.log 2>/dev/null | head -40 | tee -a "$OUT/logs/cluster.log"

# kiln-run in a fresh process on the same packages (shared store, page cache warm).
for p in $PRECISIONS; do
  t0=$(now)
  timeout 180 "$BIN/kiln-run" --model "$MODEL" --device "$DEVICE" --prompt "$PROMPT" --width $SIZE \
    --height $SIZE --steps $STEPS --seed 7 --precision "$p" --package_dir "$WORK/run-local-$p" \
    --shared_dir "$STATE/shared-cache" --nocompile --profile_steps --out "$OUT/logs/kiln-run-$p.png" --json \
    > "$OUT/kiln-run-$p.json" 2> "$OUT/logs/kiln-run-$p.err"
  echo "{\"rc\": $?, \"wall_s\": $(since "$t0")}" > "$OUT/kiln-run-$p.wall"
  log "kiln-run $p: $(cat "$OUT/kiln-run-$p.wall") $(head -c 400 "$OUT/kiln-run-$p.json")"
  rm -rf "$WORK/run-local-$p"
done
[ -n "${SMI:-}" ] && kill "$SMI" 2>/dev/null

$PY bench/gpu/cluster_summary.py "$OUT" > "$OUT/table.txt" 2> "$OUT/logs/summary.err" \
  || { log "FAILED: summary"; cat "$OUT/logs/summary.err"; }
fi  # cluster

cp "$OUT/logs/cluster.log" "$DEST/" 2>/dev/null
cp "$OUT/table.txt" "$OUT/summary.json" "$OUT"/metrics-during-denoise-*.txt "$DEST/" 2>/dev/null
tar czf "$DEST/cluster-files.tgz" --exclude='*.png' -C "$OUT" . 2>/dev/null
cp "$(ls "$OUT"/logs/warm-*-1.png 2>/dev/null | head -1)" "$DEST/" 2>/dev/null
# The precompile phase alone writes no table (its rc was 1 for that alone, 2026-12-06).
[ ! -f "$OUT/table.txt" ] || cat "$OUT/table.txt"
