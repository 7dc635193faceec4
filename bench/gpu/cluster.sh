#!/usr/bin/env bash
# The cluster path on the GPU test host (issues 10 and 11): `kiln up --device cuda` with two nodes
# on GPU 0 serving bf16 and fp8, `kiln generate` of flux-dev (synthetic seeded weights) at
# 1024x1024, 28 steps: one cold job per precision at once (packages compiled on a miss, the two
# nodes sharing one store with its single-flight compile), then warm jobs, every job's timings
# from `kiln generate --json`; the nodes' /metrics scraped every 0.5 s throughout (GPU telemetry
# while they denoise, one whole page kept from the middle of a warm denoise); then kiln-run in a
# fresh process on the same packages (from the shared store) for comparison. Prints a table last.
#
#   bench/gpu/cluster.sh OUTDIR
#
# Reuses bench/gpu/run.sh's build and weights stages. WARM_JOBS (default 3) per precision;
# COLD_TIMEOUT (default 420 s) bounds the cold jobs. KILN_GPU_WORK (default build-gpu/ in the
# repository, ignored by git, so a second call on a still-warm machine reuses the build, the
# weights and the compiled packages: REUSE=1 keeps the cluster's state directory).
set -uo pipefail
DEST=$(mkdir -p "$1" && cd "$1" && pwd)
cd "$(dirname "$0")/../.."
ROOT=$PWD
export KILN_GPU_WORK=${KILN_GPU_WORK:-$ROOT/build-gpu}
WORK=$KILN_GPU_WORK
OUT=$WORK/cluster-out
rm -rf "$OUT"; mkdir -p "$OUT/logs"
PY=${PYTHON:-python3}
DEPS=$ROOT/.device-deps
export LD_LIBRARY_PATH=$DEPS/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PATH=$DEPS/usr/bin:$PATH
export PYTHONPATH=$ROOT/pipeline/python${PYTHONPATH:+:$PYTHONPATH}
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

if [ "${SKIP_PREP:-0}" != 1 ]; then
  log "build + weights (bench/gpu/run.sh)"
  BUILD_TARGETS="kiln kiln-coordinator kiln-node kiln-run" CTEST=0 \
    bench/gpu/run.sh "$OUT/prep" build,weights > "$OUT/logs/prep.log" 2>&1
  grep -E "^\[gpu" "$OUT/logs/prep.log" | tee -a "$OUT/logs/cluster.log"
fi
[ -x "$BIN/kiln" ] && [ -x "$BIN/kiln-node" ] || { log "FAILED: build"; tail -40 "$OUT/logs/prep.log"; exit 1; }

if [ "${REUSE:-0}" != 1 ]; then rm -rf "$STATE"; fi
log "kiln up: 2 nodes on $DEVICE (GPU 0), $PRECISIONS"
t0=$(now)
"$BIN/kiln" up --detach --nodes 2 --device "$DEVICE" --precision "${PRECISIONS// /,}" --models "flux-dev=$MODEL" \
  --state-dir "$STATE" --start-timeout 180 --bin-dir "$BIN" > "$OUT/logs/up.log" 2>&1 \
  || { log "FAILED: kiln up"; cat "$OUT/logs/up.log"; tail -30 "$STATE"/logs/*.log; exit 1; }
log "cluster up in $(awk "BEGIN{print $(now) - $t0}") s"
cat "$OUT/logs/up.log"
cp "$STATE/cluster.json" "$OUT/cluster.json"
NODE_URLS=$($PY -c 'import json,sys; print(" ".join(n["metrics_url"] for n in json.load(open(sys.argv[1]))["nodes"]))' "$STATE/cluster.json")
log "node metrics: $NODE_URLS"

# Scraper: every 0.5 s, each node's kiln_gpu_* and kiln_node_* series, with a timestamp.
( while :; do
    ts=$(date +%s.%N)
    for u in $NODE_URLS; do
      curl -s -m 1 "$u" | grep -E '^kiln_(gpu|node)_' | sed "s|^|$ts $u |"
    done
    sleep 0.5
  done ) > "$OUT/metrics-samples.txt" 2>/dev/null &
SCRAPER=$!

generate() {  # name precision [extra]
  local name=$1 p=$2; shift 2
  local t0; t0=$(now)
  timeout "${GEN_TIMEOUT:-300}" "$BIN/kiln" generate --state-dir "$STATE" --model flux-dev \
    --prompt "$PROMPT" --width $SIZE --height $SIZE --steps $STEPS --seed 7 --precision "$p" \
    --no-progress --json --out "$OUT/logs/$name.png" "$@" > "$OUT/$name.json" 2> "$OUT/logs/$name.err"
  local rc=$?
  echo "{\"name\": \"$name\", \"rc\": $rc, \"start\": $t0, \"end\": $(now)}" > "$OUT/$name.wall"
  log "$name: rc $rc, $(awk "BEGIN{print $(now) - $t0}") s: $(head -c 400 "$OUT/$name.json")"
  [ $rc -eq 0 ] || tail -5 "$OUT/logs/$name.err"
}

log "cold: one job per precision at once (packages compiled on a miss)"
cold=()
for p in $PRECISIONS; do
  GEN_TIMEOUT=${COLD_TIMEOUT:-420} generate "cold-$p" "$p" &
  cold+=($!)
  sleep 1
done
wait "${cold[@]}"

for p in $PRECISIONS; do
  for i in $(seq 1 "$WARM_JOBS"); do
    if [ "$i" = 2 ]; then
      # One whole /metrics page of the node that runs it, 2.5 s into the job (its denoise).
      ( sleep 2.5; for u in $NODE_URLS; do echo "# $u at $(date +%s.%N)"; curl -s -m 2 "$u"; done \
          > "$OUT/metrics-during-denoise-$p.txt" ) &
    fi
    generate "warm-$p-$i" "$p"
  done
done
kill $SCRAPER 2>/dev/null
"$BIN/kiln" nodes --state-dir "$STATE" --json > "$OUT/nodes.json" 2>&1
"$BIN/kiln" down --state-dir "$STATE" --timeout 60 > "$OUT/logs/down.log" 2>&1
cp "$STATE"/logs/*.log "$OUT/logs/" 2>/dev/null

# kiln-run in a fresh process on the same packages (shared store, page cache warm).
for p in $PRECISIONS; do
  t0=$(now)
  timeout 180 "$BIN/kiln-run" --model "$MODEL" --device "$DEVICE" --prompt "$PROMPT" --width $SIZE \
    --height $SIZE --steps $STEPS --seed 7 --precision "$p" --package_dir "$WORK/run-local-$p" \
    --shared_dir "$STATE/shared-cache" --out "$OUT/logs/kiln-run-$p.png" --json \
    > "$OUT/kiln-run-$p.json" 2> "$OUT/logs/kiln-run-$p.err"
  echo "{\"rc\": $?, \"wall_s\": $(awk "BEGIN{print $(now) - $t0}")}" > "$OUT/kiln-run-$p.wall"
  log "kiln-run $p: $(cat "$OUT/kiln-run-$p.wall") $(head -c 400 "$OUT/kiln-run-$p.json")"
  rm -rf "$WORK/run-local-$p"
done

$PY bench/gpu/cluster_summary.py "$OUT" > "$OUT/table.txt" 2> "$OUT/logs/summary.err" \
  || { log "FAILED: summary"; cat "$OUT/logs/summary.err"; }
cp "$OUT/table.txt" "$OUT/summary.json" "$OUT"/metrics-during-denoise-*.txt "$DEST/" 2>/dev/null
tar czf "$DEST/cluster-files.tgz" --exclude='*.png' -C "$OUT" . 2>/dev/null
cp "$OUT"/logs/warm-*-1.png "$DEST/" 2>/dev/null
cat "$OUT/table.txt"
