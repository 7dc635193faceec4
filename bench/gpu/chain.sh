#!/usr/bin/env bash
# The cluster path (bench/gpu/cluster.sh, issues 10 and 11) and issue 13's regional-vs-whole
# comparison (bench/gpu/run.sh) in one detached chain on the GPU test host, sharing one build,
# one set of weights and one machine start:
#
#   bench/gpu/chain.sh OUTDIR
#
#   1. build (the cluster's binaries and kiln-bench) and the flux-dev weights      (run.sh)
#   2. at once, CPU-bound: the cluster's precompile of bf16 and fp8 into its shared store, the
#      transformer compiled on a miss in both layouts (bf16 whole-graph and regional), and the
#      eager references kiln-bench is checked against (fp8_bench.py's step part)
#   3. the cluster phase alone on the GPU: cold and warm jobs through `kiln generate`, the
#      nodes' /metrics during denoise, kiln-run on the same packages          (cluster.sh)
#   4. kiln-bench of both layouts on an idle GPU: step time plain and graphed, error vs eager
#   5. the regional compile on a miss again, alone and with an empty Inductor cache (step 2's
#      figure was taken beside eight other compiles)
# Each step writes OUTDIR/<step>/ and OUTDIR/<step>.log; OUTDIR/chain.log has one line per step.
# Run it detached (bench/README.md shows the two or three device calls that wait for it).
# PYTHONFAULTHANDLER is set, so a crash in Python (kiln-compile) leaves its traceback.
set -uo pipefail
DEST=$(mkdir -p "$1" && cd "$1" && pwd)
cd "$(dirname "$0")/../.."
export KILN_GPU_WORK=${KILN_GPU_WORK:-$PWD/build-gpu}
export PYTHONFAULTHANDLER=1
WORK=$KILN_GPU_WORK
VARIANTS_R=${VARIANTS_R:-bf16:cudnn bf16:cudnn:regional}
log() { echo "[chain $(date +%H:%M:%S)] $*" | tee -a "$DEST/chain.log"; }
step() {  # name command...: runs it, logs its rc and seconds
  local name=$1 t0 rc; shift
  t0=$(date +%s)
  "$@" > "$DEST/$name.log" 2>&1
  rc=$?
  log "$name: rc $rc in $(( $(date +%s) - t0 )) s"
  return $rc
}

log "start; work in $WORK"
step prep env BUILD_TARGETS="kiln kiln-coordinator kiln-node kiln-run kiln-bench" CTEST=0 \
  bench/gpu/run.sh "$DEST/prep" build,weights || { tail -30 "$DEST/prep.log"; exit 1; }

step precompile env PHASES=precompile bench/gpu/cluster.sh "$DEST/precompile" &
p1=$!
sleep 5
step regional-compile env VARIANTS="$VARIANTS_R" FP8_PARTS=step CTEST=0 \
  bench/gpu/run.sh "$DEST/regional-compile" compile,fp8 &
p2=$!
wait $p1 $p2

step cluster env PHASES=cluster bench/gpu/cluster.sh "$DEST/cluster"
step regional-bench env VARIANTS="$VARIANTS_R" REFS="$WORK/fp8" bench/gpu/run.sh "$DEST/regional-bench" kiln

INDUCTOR_EMPTY=$(mktemp -d)
step regional-miss env TORCHINDUCTOR_CACHE_DIR="$INDUCTOR_EMPTY" VARIANTS="bf16:cudnn:regional" \
  bench/gpu/run.sh "$DEST/regional-miss" compile
rm -rf "$INDUCTOR_EMPTY"
log "done"
