#!/usr/bin/env bash
# Batching (issue 14 item 2): images/s per GPU of flux-dev at batch B = 1, 2, 4 for 512², 768² and
# 1024². For each size and B, kiln-run --batch B (B jobs, seeds 7..7+B-1, denoised and decoded as
# one batch through the transformer and VAE packages of bucket batch B) runs twice: the first
# compiles what the shared store lacks (bucket batch B > 1 is compiled here, minutes per size
# and B on the GPU host) into a local package directory, the second is measured. Figures, from
# the second run's --json seconds:
#   - images/s per GPU = B / (denoise + decode) — the device stages a node runs per batch (text
#     encoding overlaps the denoise on a node, node/worker.h; it is reported beside);
#   - the speed-up over B = 1 at the same size.
#
#   bench/gpu/batch.sh OUTDIR       # OUTDIR: table.txt, summary.json, runs/*.json, batch.log
#
# Needs a build (BIN, default $KILN_GPU_WORK/build/bin) and the model (MODEL, default
# $KILN_GPU_WORK/flux-dev); the batch-1 packages may come from a shared store (STORE, default
# $KILN_GPU_WORK/cluster/shared-cache when it exists, from bench/gpu/cluster.sh's precompile).
# SIZES (default "512 768 1024"), BATCHES ("1 2 4"), PRECISION (bf16), STEPS (28), DEVICE (cuda),
# COMPILE_JOBS (below), COMPILE_RUN_STEPS (the first run's steps; default STEPS: fewer saves device
# time, the measured run is the second).
#
# A CPU dry run (bench/README.md): BIN=build/bin MODEL=build/testdata/flux-tiny DEVICE=cpu
# PRECISION=fp32 SIZES=256 BATCHES="1 2" STEPS=4 LOCAL=build/testdata/packages-batch
set -uo pipefail
DEST=$(mkdir -p "$1" && cd "$1" && pwd)
cd "$(dirname "$0")/../.."
ROOT=$PWD
WORK=${KILN_GPU_WORK:-$ROOT/build-gpu}
BIN=${BIN:-$WORK/build/bin}
MODEL=${MODEL:-$WORK/flux-dev}
STORE=${STORE:-$WORK/cluster/shared-cache}
LOCAL=${LOCAL:-$WORK/batch-packages}  # kept between calls: a later call compiles nothing again
DEVICE=${DEVICE:-cuda} PRECISION=${PRECISION:-bf16} STEPS=${STEPS:-28}
SIZES=${SIZES:-512 768 1024} BATCHES=${BATCHES:-1 2 4}
PY=${PYTHON:-python3}
mkdir -p "$DEST/runs" "$LOCAL"
log() { echo "[batch $(date +%H:%M:%S)] $*" | tee -a "$DEST/batch.log"; }
[ -x "$BIN/kiln-run" ] || { log "FAILED: no kiln-run in $BIN"; exit 1; }
if [ -d "$ROOT/.device-deps" ]; then  # Debian libraries of the GPU host's build (bench/gpu/run.sh)
  export LD_LIBRARY_PATH=$ROOT/.device-deps/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  export PATH=$ROOT/.device-deps/usr/bin:$PATH
fi
SHARED=()
[ -d "$STORE" ] && SHARED=(--shared_dir "$STORE")
log "$DEVICE $PRECISION, $STEPS steps, sizes $SIZES, batches $BATCHES; host: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo no-gpu)"

# The transformer packages first, COMPILE_JOBS kiln-compiles at a time (default: 3 on a card with
# >= 120 GB, else 2; 1 leaves every compile to kiln-run, one after the other): each is minutes of
# mostly single-process CPU work on a 16-core host, and the runs below then compile only the small
# packages. Each compile's wall time goes to runs/compile-<size>-b<B>.json.
COMPILE_JOBS=${COMPILE_JOBS:-auto}
TARGET=${TARGET:-$([ "$DEVICE" = cuda ] && echo cuda:sm_90 || echo cpu)}
if [ "$COMPILE_JOBS" = auto ]; then
  mem=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
  COMPILE_JOBS=$([ "${mem:-0}" -ge 120000 ] && echo 3 || echo 2)
  [ "$DEVICE" = cuda ] || COMPILE_JOBS=1
fi
compile_transformer() {  # SIZE B
  local t0=$(date +%s.%N) rc name=compile-$1-b$2
  timeout 1800 "$BIN/kiln-compile" --model "$MODEL" --component transformer \
    --precision "$PRECISION" --batch "$2" --height "$1" --width "$1" --text-len 512 \
    --target "$TARGET" --out-root "$LOCAL" > "$DEST/runs/$name.manifest" 2> "$DEST/runs/$name.err"
  rc=$?
  echo "{\"size\": $1, \"batch\": $2, \"rc\": $rc, \"wall_s\": \
$(awk "BEGIN{print $(date +%s.%N) - $t0}")}" > "$DEST/runs/$name.json"
  log "transformer ${1}² batch $2 compiled: $(cat "$DEST/runs/$name.json")"
  [ "$rc" = 0 ] || tail -5 "$DEST/runs/$name.err"
  return $rc
}
if [ "$COMPILE_JOBS" -gt 1 ]; then
  todo=()
  for size in $SIZES; do
    for b in $BATCHES; do
      [ -s "$DEST/runs/${size}-b${b}-measured.json" ] && continue
      digest=$("$BIN/kiln-compile" --model "$MODEL" --component transformer --precision "$PRECISION" \
        --batch "$b" --height "$size" --width "$size" --text-len 512 --target "$TARGET" \
        --print-key 2>/dev/null | $PY -c "import json,sys; print(json.load(sys.stdin)['digest'])")
      [ -n "$digest" ] && [ -d "$LOCAL/$digest" ] && continue
      todo+=("$size $b")
    done
  done
  log "transformer packages to compile, $COMPILE_JOBS at a time: ${todo[*]:-none}"
  running=0
  for job in "${todo[@]}"; do
    if [ "$running" -ge "$COMPILE_JOBS" ]; then wait -n; running=$((running - 1)); fi
    compile_transformer $job &
    running=$((running + 1))
  done
  wait
fi

for size in $SIZES; do
  for b in $BATCHES; do
    for run in compile measured; do
      json=$DEST/runs/${size}-b${b}-$run.json
      [ -s "$json" ] && continue  # done in an earlier call
      steps=$STEPS
      [ "$run" = compile ] && steps=${COMPILE_RUN_STEPS:-$STEPS}
      timeout 3000 "$BIN/kiln-run" --model "$MODEL" --device "$DEVICE" --precision "$PRECISION" \
        --prompt "a lighthouse on a cliff at dusk" --width "$size" --height "$size" --steps "$steps" \
        --seed 7 --batch "$b" --resolutions "${size}x${size}" --package_dir "$LOCAL" "${SHARED[@]}" \
        --out "$DEST/runs/${size}-b${b}.png" --json > "$json.tmp" 2> "$DEST/runs/${size}-b${b}-$run.err" \
        && mv "$json.tmp" "$json" \
        || { log "FAILED: kiln-run ${size}² batch $b ($run)"; tail -5 "$DEST/runs/${size}-b${b}-$run.err"; exit 1; }
      log "${size}² batch $b $run: $(head -c 300 "$json")"
    done
  done
done

$PY - "$DEST" "$SIZES" "$BATCHES" <<'EOF_SUMMARY'
import json, sys
dest, sizes, batches = sys.argv[1], sys.argv[2].split(), [int(b) for b in sys.argv[3].split()]
rows, summary = [], []
for size in sizes:
    base = None
    for b in batches:
        j = json.load(open(f"{dest}/runs/{size}-b{b}-measured.json"))
        s = j["seconds"]
        per_s = b / (s["denoise"] + s["decode"])
        base = per_s if b == 1 else base
        summary.append({"size": int(size), "batch": b, "denoise_s": s["denoise"], "decode_s": s["decode"],
                        "text_encoding_s": s["text_encoding"], "images_per_s": per_s,
                        "speedup": per_s / base if base else None,
                        "cuda_graph": j["denoise_profile"]["cuda_graph"]})
        r = summary[-1]
        rows.append(f"| {size}² | {b} | {r['denoise_s']:.3f} | {r['decode_s']:.3f} | "
                    f"{r['text_encoding_s']:.3f} | {per_s:.3f} | "
                    + (f"{r['speedup']:.2f}×" if r["speedup"] else "—") + f" | {r['cuda_graph']} |")
head = ("| size | B | denoise s | decode s | text encoding s (per job, overlapped on a node) | "
        "images/s per GPU | vs B=1 | CUDA graph |\n|---|---|---|---|---|---|---|---|")
open(f"{dest}/table.txt", "w").write(head + "\n" + "\n".join(rows) + "\n")
json.dump(summary, open(f"{dest}/summary.json", "w"), indent=1)
print(head); print("\n".join(rows))
EOF_SUMMARY
