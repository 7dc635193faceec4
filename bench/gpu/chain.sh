#!/usr/bin/env bash
# The cluster path (bench/gpu/cluster.sh, issues 10 and 11) and issue 13's regional-vs-whole
# comparison (bench/gpu/run.sh) in one detached chain on the GPU test host, sharing one build,
# one set of weights and one machine start (not yet run end to end; an estimate from the steps
# measured on the H100 on 2026-12-05 — prep 92 s, precompile ~250 s, a transformer compile 104-167 s —
# is 12-15 min plus the machine start):
#
#   bench/gpu/chain.sh OUTDIR
#
#   prep              build (the cluster's binaries, kiln-canary, kiln-bench) and flux-dev weights
#   precompile        the cluster's packages, bf16 and fp8 at once, into its shared store
#   cluster           cold and warm jobs through `kiln generate`, the nodes' /metrics during
#                     denoise, kiln-run on the same packages (the GPU to itself)
#   regional-miss     the regional transformer (bf16) compiled on a miss, alone, with an empty
#                     Inductor cache: issue 13's compile-time target (<= 30 s)
#   stream            bench/gpu/stream.sh: STREAM_JOBS (default 50) fp8 jobs at 1024² through one
#                     node that overlaps them, images/hour against kiln-run's bound, NVML
#                     utilization over the stream (issue 14 item 1; the precompile's fp8 packages)
#   lora              bench/gpu/run.sh's lora stage on the precompile's shared store: a rank-64
#                     LoRA's prepare and switch times, bf16 and fp8 (issue 14 item 3)
#   compile-miss      bench/gpu/compile_miss.sh: the regional transformer (bf16) compiled on a
#                     miss with cold Inductor and Triton caches (1024²), then a new bucket with
#                     them warm (768²), every child process recorded (issue 13's <= 30 s)
#   batch             bench/gpu/batch.sh on the precompile's shared store: images/s per GPU at
#                     batch 1, 2, 4 for BATCH_SIZES (default "1024 512 768": 1024's batch-1
#                     packages come from the precompile, so its figures come first) (issue 14
#                     item 2; not in the default list: minutes of compiling per size and batch)
#   region-profile    where a region's compile on a miss goes (bench/gpu/region_profile.py: the
#                     tail and double regions with kiln-compile's Inductor options, each alone
#                     with an empty Inductor cache, Inductor's timers and cProfile)
#   import-probe      bench/gpu/import_probe.sh: a fresh Python's import times on the host, as is
#                     and with bytecode written (the region workers' ~15 s of imports)
#   fp8-attn          bench/gpu/run.sh stages compile,fp8,kiln for the regional fp8 transformer
#                     with cuDNN and with kiln's fp8 attention (VARIANTS_A), fp8_bench.py's
#                     FP8_PARTS (default sweep,attention,step) beside the compiles: kernel sweep and
#                     buckets against cuDNN, eager/compile steps, kiln-bench of both packages
#   attn-lab          bench/gpu/attn_lab.py: variants of kiln's fp8 attention kernel side by side
#                     (speed at [1, 24, 4608, 128], error of each inside the flux-dev transformer
#                     against eager bf16; issue 13 item 2; not in the default list)
#   fused-quant       issue 13 item 3: bench/gpu/fused_quant_bench.py (kiln's fused quantization
#                     kernels against Inductor's fusion of the unfused ops and bf16's producer;
#                     FQ_SWEEP=1 sweeps their launch configurations first; FQ_KERNELS=0 skips it),
#                     then bench/gpu/run.sh stages compile,fp8,kiln for the regional fp8 + fp8
#                     attention transformer without and with fused_quant (VARIANTS_Q), eager
#                     references (FP8_STEP_VARIANTS, FP8_STEP_MODES, default eager only) beside
#                     the compiles, kiln-bench of both (not in the default list)
#   whole-and-refs    the whole-graph transformer (bf16) compiled on a miss, beside fp8_bench.py's
#                     step part (the eager references and inputs kiln-bench is checked against)
#   regional-bench    kiln-bench of both layouts on an idle GPU: step time plain and graphed,
#                     error against eager
# CHAIN_STEPS (comma list, default all of the above after prep, in that order) picks the steps
# after prep, e.g. CHAIN_STEPS=precompile,cluster,region-profile when device time is short;
# PROFILE_REGIONS (default tail,double) picks region-profile's regions.
# Nothing GPU-heavy runs beside the precompile or beside another transformer compile: on
# 2026-12-05 the two compiles plus fp8_bench.py beside the precompile ran the H100 out of memory
# (every compile builds its module on the device). Each step writes OUTDIR/<step>/ and
# OUTDIR/<step>.log; OUTDIR/chain.log has one line per step. Run it detached (bench/README.md).
# PYTHONFAULTHANDLER is set, so a crash in Python (kiln-compile) leaves its traceback.
set -uo pipefail
DEST=$(mkdir -p "$1" && cd "$1" && pwd)
cd "$(dirname "$0")/../.."
export KILN_GPU_WORK=${KILN_GPU_WORK:-$PWD/build-gpu}
export PYTHONFAULTHANDLER=1
WORK=$KILN_GPU_WORK
VARIANTS_R=${VARIANTS_R:-bf16:cudnn bf16:cudnn:regional}
CHAIN_STEPS=${CHAIN_STEPS:-precompile,cluster,stream,lora,compile-miss,regional-miss,whole-and-refs,regional-bench,region-profile}
want() { [[ ",$CHAIN_STEPS," == *",$1,"* ]]; }
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
step prep env BUILD_TARGETS="kiln kiln-coordinator kiln-node kiln-run kiln-canary" CTEST=0 \
  bench/gpu/run.sh "$DEST/prep" build,weights || { tail -30 "$DEST/prep.log"; exit 1; }
# kiln-bench (its regional path compiled only with CUDA) apart, and only for regional-bench: a
# failure there costs only that step, not the chain.
want_bench() { want regional-bench || want fp8-attn || want fused-quant; }
want_bench && step bench-build env BUILD_TARGETS="kiln-bench" CTEST=0 bench/gpu/run.sh "$DEST/bench-build" build ||
  { tail -30 "$DEST/bench-build.log" | tee -a "$DEST/chain.log"; CHAIN_STEPS=${CHAIN_STEPS//regional-bench/}
    CHAIN_STEPS=${CHAIN_STEPS//fp8-attn/}; CHAIN_STEPS=${CHAIN_STEPS//fused-quant/}; }

want import-probe && step import-probe bench/gpu/import_probe.sh "$WORK/pycache-probe"
want import-probe && cat "$DEST/import-probe.log" >> "$DEST/chain.log"

want precompile && step precompile env PHASES=precompile bench/gpu/cluster.sh "$DEST/precompile"
want cluster && step cluster env PHASES=cluster bench/gpu/cluster.sh "$DEST/cluster"
want stream && step stream bench/gpu/stream.sh "$DEST/stream"
want stream && tail -12 "$DEST/stream/table.txt" 2>/dev/null | tee -a "$DEST/chain.log"
want lora && step lora env SHARED="$WORK/cluster/shared-cache" CTEST=0 bench/gpu/run.sh "$DEST/lora" lora
want compile-miss && step compile-miss env MISS_CACHES="$WORK/miss-caches" \
  bench/gpu/compile_miss.sh "$DEST/compile-miss"
want compile-miss && grep ': rc ' "$DEST/compile-miss/compile-miss.log" | tee -a "$DEST/chain.log"
want batch && step batch env SIZES="${BATCH_SIZES:-1024 512 768}" COMPILE_RUN_STEPS=${COMPILE_RUN_STEPS:-0} bench/gpu/batch.sh "$DEST/batch"
want batch && tail -12 "$DEST/batch/table.txt" 2>/dev/null | tee -a "$DEST/chain.log"

if want regional-miss; then
  INDUCTOR_EMPTY=$(mktemp -d)
  step regional-miss env TORCHINDUCTOR_CACHE_DIR="$INDUCTOR_EMPTY" VARIANTS="bf16:cudnn:regional" \
    bench/gpu/run.sh "$DEST/regional-miss" compile
  rm -rf "$INDUCTOR_EMPTY"
fi
want whole-and-refs && step whole-and-refs env VARIANTS="bf16:cudnn" FP8_PARTS=step bench/gpu/run.sh "$DEST/whole-and-refs" \
  compile,fp8
want regional-bench && step regional-bench env VARIANTS="$VARIANTS_R" REFS="$WORK/fp8" bench/gpu/run.sh "$DEST/regional-bench" kiln
want fp8-attn && step fp8-attn env VARIANTS="${VARIANTS_A:-fp8:cudnn:regional fp8:fp8:regional}" \
  FP8_PARTS="${FP8_PARTS:-sweep,attention,step}" CTEST=0 bench/gpu/run.sh "$DEST/fp8-attn" compile,fp8,kiln
want fp8-attn && tail -40 "$DEST/fp8-attn/table.txt" 2>/dev/null | tee -a "$DEST/chain.log"
want fused-quant && [ "${FQ_KERNELS:-1}" = 1 ] && step fused-quant-kernels env PYTHONPATH="$PWD/pipeline/python" \
  python3 bench/gpu/fused_quant_bench.py --out "$DEST/fused-quant-kernels" ${FQ_SWEEP:+--sweep}
want fused-quant && tail -6 "$DEST/fused-quant-kernels/fused-quant-table.txt" 2>/dev/null |
  tee -a "$DEST/chain.log"
want fused-quant && step fused-quant env \
  VARIANTS="${VARIANTS_Q:-fp8:fp8:regional fp8:fp8:regional:fq}" FP8_PARTS=step \
  FP8_STEP_VARIANTS="${FP8_STEP_VARIANTS:-bf16:cudnn,fp8:fp8,fp8:fp8:fq}" \
  FP8_STEP_MODES="${FP8_STEP_MODES:-eager}" CTEST=0 \
  bench/gpu/run.sh "$DEST/fused-quant" compile,fp8,kiln
want fused-quant && tail -40 "$DEST/fused-quant/table.txt" 2>/dev/null | tee -a "$DEST/chain.log"
want attn-lab && step attn-lab env PYTHONPATH="$PWD/pipeline/python" python3 bench/gpu/attn_lab.py \
  --model "$WORK/flux-dev" --parts "${LAB_PARTS:-speed,model}" --out "$DEST/attn-lab"
want attn-lab && cat "$DEST/attn-lab/attn-lab-table.txt" | tee -a "$DEST/chain.log"
want region-profile && step region-profile env PYTHONPATH="$PWD/pipeline/python" python3 bench/gpu/region_profile.py \
  --model "$WORK/flux-dev" --precision bf16 --regions "${PROFILE_REGIONS:-tail,double}" --variants default \
  --out "$DEST/region-profile"
want region-profile && tail -8 "$DEST/region-profile.log" | tee -a "$DEST/chain.log"
log "done"
