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
# SIZES (default "512 768 1024"; an entry SIZE:B,B,... gives that size its own batch sizes),
# BATCHES ("1 2 4"), PRECISION (bf16), STEPS (28), DEVICE (cuda),
# COMPILE_JOBS (below), COMPILE_RUN_STEPS (the first run's steps; default STEPS; 0 skips it: with
# every package compiled first it only warms up; in the 2026-12-07 H100 runs at 512² its
# denoise + decode, the figure's denominator, was within 0.3 % of the measured run's).
#
# A CPU dry run (bench/README.md): BIN=build/bin MODEL=build/testdata/flux-tiny DEVICE=cpu
# PRECISION=fp32 SIZES=256 BATCHES="1 2" STEPS=4 LOCAL=build/testdata/packages-batch
set -uo pipefail
source "$(dirname "$0")/env.sh"  # DEST ROOT WORK BIN MODEL PY, the .device-deps libraries
STORE=${STORE:-$WORK/cluster/shared-cache}
LOCAL=${LOCAL:-$WORK/batch-packages}  # kept between calls: a later call compiles nothing again
DEVICE=${DEVICE:-cuda} PRECISION=${PRECISION:-bf16} STEPS=${STEPS:-28}
SIZES=${SIZES:-512 768 1024} BATCHES=${BATCHES:-1 2 4}
mkdir -p "$DEST/runs" "$LOCAL"
log() { echo "[batch $(date +%H:%M:%S)] $*" | tee -a "$DEST/batch.log"; }
[ -x "$BIN/kiln-run" ] || { log "FAILED: no kiln-run in $BIN"; exit 1; }
SHARED=()
[ -d "$STORE" ] && SHARED=(--shared_dir "$STORE")
log "$DEVICE $PRECISION, $STEPS steps, sizes $SIZES, batches $BATCHES; host: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo no-gpu)"

batches_of() {  # SIZE or SIZE:B,B,... -> its batch sizes
  if [[ $1 == *:* ]]; then echo "${1#*:}" | tr , ' '; else echo "$BATCHES"; fi
}
# Every package the runs need is compiled first, in two pools side by side: the transformers,
# COMPILE_JOBS at a time (default: 3 on a card of >= 120 GB, else 2: each holds the checkpoint on
# the device while it compiles), and the small ones (VAE decoder per size and B — a minute each
# at B > 1 on the H100 —, the two text encoders once), two at a time. COMPILE_JOBS=1 leaves every
# compile to kiln-run, one after the other. Each compile's wall goes to
# runs/compile-<component>-<size>-b<B>.json.
COMPILE_JOBS=${COMPILE_JOBS:-auto}
TARGET=${TARGET:-$([ "$DEVICE" = cuda ] && echo cuda:sm_90 || echo cpu)}
if [ "$COMPILE_JOBS" = auto ]; then
  mem=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
  COMPILE_JOBS=$([ "${mem:-0}" -ge 120000 ] && echo 3 || echo 2)
  [ "$DEVICE" = cuda ] || COMPILE_JOBS=1
fi
# The bucket kiln-run asks for (pipeline/key_policy.cc): COMPONENT SIZE B -> kiln-compile flags;
# the text encoders are per prompt (batch 1), CLIP at 77 tokens, T5 at 512; precision as kiln-run's
# (bf16 for all but an fp8 transformer).
package_flags() {
  local prec=$PRECISION
  [ "$PRECISION" = fp8 ] && [ "$1" != transformer ] && prec=bf16
  case $1 in
    transformer) echo "--precision $prec --batch $3 --height $2 --width $2 --text-len 512" ;;
    vae_decoder) echo "--precision $prec --batch $3 --height $2 --width $2" ;;
    text_encoder) echo "--precision $prec --text-len 77" ;;
    text_encoder_2) echo "--precision $prec --text-len 512" ;;
  esac
}
compile_package() {  # COMPONENT SIZE B
  local t0=$(date +%s.%N) rc name=compile-$1-$2-b$3
  # shellcheck disable=SC2046  # package_flags' words are flags
  timeout 1800 "$BIN/kiln-compile" --model "$MODEL" --component "$1" $(package_flags "$@") \
    --target "$TARGET" --out-root "$LOCAL" > "$DEST/runs/$name.manifest" 2> "$DEST/runs/$name.err"
  rc=$?
  echo "{\"component\": \"$1\", \"size\": $2, \"batch\": $3, \"rc\": $rc, \"wall_s\": \
$(awk "BEGIN{print $(date +%s.%N) - $t0}")}" > "$DEST/runs/$name.json"
  log "$1 ${2}² batch $3 compiled: $(cat "$DEST/runs/$name.json")"
  [ "$rc" = 0 ] || tail -5 "$DEST/runs/$name.err"
  return $rc
}
# "COMPONENT SIZE B" lines on stdin -> those whose package neither LOCAL nor STORE holds. One
# Python process asks kiln-compile's --print-key for every key (a process each cost seconds).
KEY_FILTER='
import contextlib, io, json, os, sys
from kiln import compile as kc
model, target, *roots = sys.argv[1:]
for line in sys.stdin:
    job, flags = line.rstrip("\n").split("|")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        rc = kc.main(["--model", model, "--component", job.split()[0], "--target", target,
                      "--print-key", *flags.split()])
    digest = json.loads(out.getvalue())["digest"] if rc == 0 else ""
    # A key that cannot be made counts as missing: its compile below says why.
    if not digest or not any(os.path.isdir(os.path.join(r, digest)) for r in roots):
        print(job)
'
missing() {
  local job
  # shellcheck disable=SC2086  # package_flags' words are flags
  while read -r job; do echo "$job|$(package_flags $job)"; done |
    PYTHONPATH=$ROOT/pipeline/python${PYTHONPATH:+:$PYTHONPATH} \
    $PY -c "$KEY_FILTER" "$MODEL" "$TARGET" "$LOCAL" "$STORE"
}
pool() {  # N JOB...: runs compile_package on each "COMPONENT SIZE B", N at a time
  local n=$1 running=0 job
  shift
  for job in "$@"; do
    if [ "$running" -ge "$n" ]; then wait -n; running=$((running - 1)); fi
    # shellcheck disable=SC2086
    compile_package $job &
    running=$((running + 1))
  done
  wait
}
if [ "$COMPILE_JOBS" -gt 1 ]; then
  wanted=("text_encoder 0 1" "text_encoder_2 0 1")
  for entry in $SIZES; do
    size=${entry%%:*}
    for b in $(batches_of "$entry"); do
      [ -s "$DEST/runs/${size}-b${b}-measured.json" ] && continue
      wanted+=("transformer $size $b" "vae_decoder $size $b")
    done
  done
  big=() small=()
  while read -r job; do
    case $job in transformer\ *) big+=("$job") ;; *) small+=("$job") ;; esac
  done < <(printf '%s\n' "${wanted[@]}" | missing)
  log "to compile: transformers ${COMPILE_JOBS} at a time: ${big[*]:-none}; the rest 2 at a time: \
${small[*]:-none}"
  pool "$COMPILE_JOBS" "${big[@]}" &
  pool 2 "${small[@]}" &
  wait
fi

for entry in $SIZES; do
  size=${entry%%:*}
  for b in $(batches_of "$entry"); do
    for run in compile measured; do
      json=$DEST/runs/${size}-b${b}-$run.json
      [ -s "$json" ] && continue  # done in an earlier call
      steps=$STEPS
      [ "$run" = compile ] && steps=${COMPILE_RUN_STEPS:-$STEPS}
      [ "$steps" = 0 ] && continue  # no compiling run: the packages were all compiled above
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
dest, entries, default = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
rows, summary = [], []
for entry in entries:
    size, _, listed = entry.partition(":")
    batches = [int(b) for b in (listed.split(",") if listed else default)]
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
