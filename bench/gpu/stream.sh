#!/usr/bin/env bash
# A stream of jobs through one node that overlaps them (issue 14 item 1): `kiln up` with one node
# (job_slots 2: the running job and one prefetched, whose text encoding runs beside the running
# denoise while the job before has its PNG made), STREAM_JOBS (default 50) jobs of flux-dev at
# SIZE² (default 1024) and PRECISION (default fp8) submitted at once, distinct seeds. Measured:
#   - images per hour over the stream, (N − 1) / (last end − first end) (the first job's own
#     latency left out) and N / (last end − first submit);
#   - the bound it is held against, 3600 / (denoise + decode) of one job in kiln-run (warm,
#     same packages);
#   - GPU utilization from NVML (the node's kiln_gpu_utilization_ratio, scraped every 0.5 s,
#     nvidia-smi beside it) between the first and the last job's end: mean and the share of
#     samples under 0.97 (target: mean ≥ 0.97);
#   - images per device-second from the node's kiln_node_images_total and
#     kiln_node_device_seconds_total over the stream.
#
#   bench/gpu/stream.sh OUTDIR
#
# Needs a build (BIN, default $KILN_GPU_WORK/build/bin) and the model (MODEL, default
# $KILN_GPU_WORK/flux-dev), and the packages in the shared store that bench/gpu/cluster.sh's
# precompile phase leaves ($KILN_GPU_WORK/cluster/shared-cache; STORE overrides): run
# `PHASES=prep,precompile PRECISIONS=fp8 bench/gpu/cluster.sh OUT` first. A warm-up job loads the
# packages (and captures the CUDA graph) before the stream.
#
# A CPU dry run (bench/README.md): BIN=build/bin MODEL=build/testdata/flux-tiny
# STORE=<dir with flux-tiny packages> DEVICE=cpu SIZE=256 PRECISION=fp32 STEPS=4 STREAM_JOBS=8
set -uo pipefail
source "$(dirname "$0")/env.sh"  # DEST ROOT WORK BIN MODEL PY, the .device-deps libraries
STORE=${STORE:-$WORK/cluster/shared-cache}
DEVICE=${DEVICE:-cuda} SIZE=${SIZE:-1024} STEPS=${STEPS:-28} PRECISION=${PRECISION:-fp8}
N=${STREAM_JOBS:-50}
export PYTHONPATH=$ROOT/pipeline/python${PYTHONPATH:+:$PYTHONPATH}
OUT=$WORK/stream-out
STATE=$WORK/stream-cluster
rm -rf "$OUT" "$STATE"; mkdir -p "$OUT/logs" "$STATE"
PROMPT="a lighthouse on a cliff at dusk"
log() { echo "[stream $(date +%H:%M:%S)] $*" | tee -a "$OUT/logs/stream.log"; }
[ -x "$BIN/kiln" ] && [ -x "$BIN/kiln-node" ] && [ -x "$BIN/kiln-run" ] || { log "FAILED: no build in $BIN"; exit 1; }
[ -d "$STORE" ] || { log "FAILED: no package store $STORE (bench/gpu/cluster.sh precompile)"; exit 1; }
log "$N jobs, $DEVICE ${SIZE}x$SIZE $PRECISION, $STEPS steps; host: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo no-gpu)"

# The bound: one warm job's denoise + decode in kiln-run (the first run loads, the second is warm:
# kiln-run runs one job a process, so the second process reads the packages from local disk).
for i in 1 2; do
  timeout 600 "$BIN/kiln-run" --model "$MODEL" --device "$DEVICE" --prompt "$PROMPT" --width "$SIZE" \
    --height "$SIZE" --steps "$STEPS" --seed 7 --precision "$PRECISION" --package_dir "$WORK/stream-run-local" \
    --shared_dir "$STORE" --nocompile --out "$OUT/logs/kiln-run.png" --json > "$OUT/kiln-run-$i.json" 2> "$OUT/logs/kiln-run-$i.err" \
    || { log "FAILED: kiln-run"; tail -5 "$OUT/logs/kiln-run-$i.err"; exit 1; }
done
log "kiln-run: $(head -c 600 "$OUT/kiln-run-2.json")"
rm -rf "$WORK/stream-run-local"

mkdir -p "$STATE/shared-cache" && cp -a "$STORE"/. "$STATE/shared-cache/"
# The store's packages are signed by its cluster's key: `kiln up` signs with and trusts the key it
# finds in its state dir (without it, the node refuses them and compiles its own).
[ -d "$(dirname "$STORE")/keys" ] && cp -a "$(dirname "$STORE")/keys" "$STATE/keys"
if [ "$DEVICE" != cpu ] && command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,power.draw,clocks.sm \
    --format=csv,noheader,nounits -lms 500 > "$OUT/nvidia-smi.csv" 2>/dev/null &
  SMI=$!
fi
"$BIN/kiln" up --detach --nodes 1 --device "$DEVICE" --precision "$PRECISION" --models "flux-dev=$MODEL" \
  --state-dir "$STATE" --start-timeout 180 --bin-dir "$BIN" > "$OUT/logs/up.log" 2>&1 \
  || { log "FAILED: kiln up"; cat "$OUT/logs/up.log"; exit 1; }
NODE_URL=$($PY -c 'import json,sys; print(json.load(open(sys.argv[1]))["nodes"][0]["metrics_url"])' "$STATE/cluster.json")
log "node metrics: $NODE_URL"
$PY - "$OUT/metrics-samples.txt" "$NODE_URL" <<'EOF_SCRAPER' &
import re, sys, time, urllib.request
out = open(sys.argv[1], "w", buffering=1)
keep = re.compile(r"^kiln_(gpu|node)_")
while True:
    ts = time.time()
    try:
        text = urllib.request.urlopen(sys.argv[2], timeout=1).read().decode()
    except Exception:
        text = ""
    for line in text.splitlines():
        if keep.match(line) and "_bucket{" not in line:
            out.write(f"{ts:.3f} {line}\n")
    time.sleep(0.5)
EOF_SCRAPER
SCRAPER=$!

submit() {  # id seed
  "$BIN/kiln" submit --state-dir "$STATE" --job-id "$1" --model flux-dev --prompt "$PROMPT $2" \
    --width "$SIZE" --height "$SIZE" --steps "$STEPS" --seed "$2" --precision "$PRECISION" --json \
    > "$OUT/logs/submit-$1.json" 2>&1 || log "submit $1 failed: $(cat "$OUT/logs/submit-$1.json")"
}
wait_job() {  # id
  timeout 3600 "$BIN/kiln" wait "$1" --state-dir "$STATE" --no-progress --json > "$OUT/$1.json" 2> "$OUT/logs/$1.err"
}
log "warm-up job"
submit warmup 1 && wait_job warmup
log "warm-up: $(head -c 400 "$OUT/warmup.json")"
sleep 2
date +%s.%N > "$OUT/stream.start"
for i in $(seq 1 "$N"); do submit "s$i" $((100 + i)); done
log "submitted $N jobs in $(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $(cat "$OUT/stream.start")}") s"
for i in $(seq 1 "$N"); do wait_job "s$i" || log "s$i: wait failed"; done
date +%s.%N > "$OUT/stream.end"
sleep 1
kill "$SCRAPER" 2>/dev/null
[ -n "${SMI:-}" ] && kill "$SMI" 2>/dev/null
"$BIN/kiln" down --state-dir "$STATE" --timeout 60 > "$OUT/logs/down.log" 2>&1
cp "$STATE"/logs/*.log "$OUT/logs/" 2>/dev/null

$PY bench/gpu/stream_summary.py "$OUT" "$N" > "$OUT/table.txt" 2> "$OUT/logs/summary.err" \
  || { log "FAILED: summary"; cat "$OUT/logs/summary.err"; }
cp "$OUT/logs/stream.log" "$OUT/table.txt" "$OUT/summary.json" "$DEST/" 2>/dev/null
tar czf "$DEST/stream-files.tgz" --exclude='*.png' -C "$OUT" . 2>/dev/null
cat "$OUT/table.txt" 2>/dev/null
