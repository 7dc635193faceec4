#!/usr/bin/env bash
# One invocation on the GPU test host: build kiln against the host's torch (CUDA), run the GPU
# checks and the benchmark of issue 4 side by side, write OUTDIR/bench.json and logs, print a
# table last (DEST = OUTDIR). Everything at one bucket (default 1024x1024, T5 512 tokens), bf16 and fp8.
#
#   bench/gpu/run.sh OUTDIR [STAGES]
#
# STAGES (comma list; default build,weights,cold,baselines,kiln,warm, in this order; ~9 min):
#   build      configure + build kiln-run, kiln-bench and the GPU-relevant tests (Release; or the
#              targets in BUILD_TARGETS); runs those tests unless CTEST=0 (46 s on the H200 host)
#   weights    flux-dev repository with synthetic seeded bf16 weights, generated on the GPU
#              (runs while `build` compiles)
#   tiny       (on request) flux-tiny on cuda (bf16): packages compiled, CUDA graph replay gives
#              the same bytes as plain runs and a second process, sync check armed; the same
#              for the regional layout (its loop captured as one graph), and regional vs whole
#   cold       cold start with packages compiled on a miss: kiln-run bf16 and fp8 as two fresh
#              processes on empty local and shared package stores (compiles run concurrently;
#              each process compiles its missing components in parallel; bf16 and fp8 share the
#              text encoders and VAE through the shared store's compile lease)
#   baselines  bench/gpu/baselines.py: attention kernels; eager and regional torch.compile, bf16
#              and fp8, on the same weights and inputs; torch.compile cold start in a fresh
#              process with an empty and then a warm Inductor cache
#   kiln       kiln-bench bf16 and fp8 on those inputs: plain and CUDA-graph step times, errors
#              against eager, peak memory, kernel-class profile
#   warm       cold start with packages found in the shared store (fresh local store, page cache
#              dropped first where the host allows: weight read throughput from disk), then the
#              28-step end-to-end latency in a fresh process, bf16 and fp8; the disk's own read
#              rate (dd, 1 and 4 streams) as the ceiling for the weight read
# On request only: lora (issue 14: a seeded rank-64 LoRA on every attention and MLP projection of
# flux-dev, PEFT layout, bf16; kiln-run --lora_switches 6 at bf16 and fp8: six jobs alternating
# base / LoRA after the first, each switch's lora_load_s (files, first use only), lora_prepare_s
# (merge into new weight tensors, in the job's encode stage: hidden under the denoise before
# it on a node) and lora_switch_s (their load, on the critical path) in lora-<precision>.json, and
# lora-bf16-at-switch.json with --nolora_prepare_ahead (merge + load at the switch); target
# lora_prepare_s + lora_switch_s <= 0.15; needs
# build,weights and packages in the shared store or compiles them), autotune (max_autotune packages against this run's, AUTOTUNE_PRECISIONS) and
# buckets (BUCKETS, default "512x512 768x768", bf16: compiled, found, and without CUDA graph).
#
# Issue 13 (fp8 attention), each list fitting one 10-minute call on the H200 host:
#   weights,fp8            bench/gpu/fp8_bench.py (FP8_PARTS, default attention,gemm,block,step;
#                          "sweep" first tries the kernel's launch configurations):
#                          kiln's fp8 attention kernel against cuDNN bf16 at every bucket, fp8
#                          GEMM forms, AOTI compile of one block of each type, and eager and
#                          regional torch.compile steps for FP8_STEP_VARIANTS (default bf16,
#                          fp8 and fp8 + fp8 attention; "fp8:fp8:fq" adds fused quantization);
#                          writes fp8.json, inputs.safetensors and the eager references (~7 min)
#   build,weights,compile,kiln
#                          kiln-compile of the transformer for each of VARIANTS (default
#                          "bf16:cudnn fp8:cudnn fp8:fp8", precision:attention) at once, compile
#                          seconds on a miss, then kiln-bench of each on the inputs and references
#                          in REFS (default: this run's fp8 or baselines stage; a folder carried
#                          from an earlier call's fp8 stage works: the weights are seeded) (~7 min)
#
# BUCKET=WxH (default 1024x1024) measures another bucket; packages are reused within the run
# (the shared store under $KILN_GPU_WORK). The host has no package registry: the Debian libraries
# travel unpacked in .device-deps/ (see bench/README.md).
set -uo pipefail
DEST=$(mkdir -p "$1" && cd "$1" && pwd)
STAGES=${2:-build,weights,cold,baselines,kiln,warm}
cd "$(dirname "$0")/../.."
ROOT=$PWD
WORK=${KILN_GPU_WORK:-/tmp/kiln-gpu}
BUCKET=${BUCKET:-1024x1024}
W=${BUCKET%x*} H=${BUCKET#*x}
# Everything is written under $OUT and packed at the end into DEST: bench.json, table.txt and
# run-files.tgz (the device tool returns at most 8 files).
OUT=$WORK/run-out
rm -rf "$OUT"
mkdir -p "$WORK" "$OUT/logs"
DEPS=$ROOT/.device-deps
PY=${PYTHON:-python3}
export LD_LIBRARY_PATH=$DEPS/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PATH=$DEPS/usr/bin:$PATH
export PKG_CONFIG_SYSROOT_DIR=$DEPS
export PKG_CONFIG_PATH=$DEPS/usr/lib/x86_64-linux-gnu/pkgconfig:$DEPS/usr/share/pkgconfig
export PYTHONPATH=$ROOT/pipeline/python${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
BIN=$WORK/build/bin
MODEL=$WORK/flux-dev
SHARED=${SHARED:-$WORK/shared}  # the shared package store (SHARED: another, e.g. the cluster's)
PROMPT="a lighthouse on a cliff at dusk"
FAILED=()
has() { [[ ",$STAGES," == *",$1,"* ]]; }
log() { echo "[gpu $(date +%H:%M:%S)] $*"; }
fail() { log "FAILED: $*"; FAILED+=("$1"); }
now() { date +%s.%N; }
# kiln-run on flux-dev; writes $OUT/<name>.json (+ wall seconds from exec to exit in .wall).
kiln_run() {
  local name=$1; shift
  local t0; t0=$(now)
  "$BIN/kiln-run" --model "$MODEL" --device cuda --prompt "$PROMPT" --width "$W" --height "$H" \
    --steps 28 --seed 7 --resolutions "$BUCKET" --out "$OUT/logs/$name.png" --json "$@" \
    > "$OUT/$name.json" 2> "$OUT/logs/$name.err"
  local rc=$?
  awk "BEGIN{print $(now) - $t0}" > "$OUT/$name.wall"
  if [ $rc -ne 0 ]; then tail -20 "$OUT/logs/$name.err"; fail "$name"; return 1; fi
  log "$name: $(cat "$OUT/$name.wall") s wall: $(head -c 600 "$OUT/$name.json")"
}

log "host: $(nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader 2>/dev/null || echo no-gpu)"
log "torch: $($PY -c 'import torch;print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/logs/gpu.txt" 2>&1

if has weights && { [ ! -f "$MODEL/transformer/diffusion_pytorch_model.safetensors" ] ||
                    [ ! -f "$MODEL/text_encoder_2/model.safetensors" ]; }; then
  log "flux-dev with synthetic bf16 weights (generated on the GPU) in $MODEL (background)"
  ( $PY -m kiln.make_synthetic "$MODEL" --config flux-dev --device cuda --dtype bf16 \
      > "$OUT/devweights.json" 2> "$OUT/logs/devweights.err" ) &
  WEIGHTS_PID=$!
fi

if has build; then
  log "configure + build (Release) in $WORK/build"
  start=$(date +%s)
  { cmake -S . -B "$WORK/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DKILN_PYTHON="$(command -v $PY)" \
      -DCMAKE_PREFIX_PATH="$($PY -c 'import torch.utils;print(torch.utils.cmake_prefix_path)');$DEPS/usr" \
      -DCMAKE_CUDA_ARCHITECTURES=90 -DTORCH_CUDA_ARCH_LIST=9.0 > "$OUT/logs/configure.log" 2>&1 &&
    cmake --build "$WORK/build" -j"$(nproc)" --target ${BUILD_TARGETS:-kiln-run kiln-bench \
      pipeline_tokenizer_test pipeline_safetensors_test pipeline_scheduler_test pipeline_png_test \
      cache_artifact_key_test pipeline_weights_test} > "$OUT/logs/build.log" 2>&1; } \
    || { grep -E "error|Error" "$OUT/logs/build.log" "$OUT/logs/configure.log" | head -40; fail build; }
  log "built in $(( $(date +%s) - start )) s"
  if [ "${CTEST:-1}" = 1 ]; then
    (cd "$WORK/build" && ctest -R "tokenizer|safetensors|scheduler|png|artifact_key|weights" \
       --output-on-failure > "$OUT/logs/ctest.log" 2>&1) && log "ctest passed" \
      || { grep -E "Failed|SEGFAULT|FAILED" "$OUT/logs/ctest.log" | head; fail ctest; }
  fi
fi

if has tiny; then
  log "flux-tiny on cuda: compile, then plain vs CUDA-graph runs, sync check armed"
  rm -rf "$WORK/flux-tiny" "$WORK/packages-tiny"
  $PY -m kiln.make_tiny "$WORK/flux-tiny" --seed 0 > /dev/null
  for v in graph:--cuda_graphs plain:--nocuda_graphs graph2:--cuda_graphs; do
    "$BIN/kiln-run" --model "$WORK/flux-tiny" --package_dir "$WORK/packages-tiny" --device cuda \
      --precision bf16 --prompt "$PROMPT" --width 256 --height 256 --steps 4 --seed 7 \
      --profile_steps "${v#*:}" --out "$OUT/logs/tiny-${v%%:*}.png" --json \
      > "$OUT/tiny-${v%%:*}.json" 2> "$OUT/logs/tiny-${v%%:*}.err" \
      || { tail -20 "$OUT/logs/tiny-${v%%:*}.err"; fail "tiny-${v%%:*}"; }
  done
  if cmp -s "$OUT/logs/tiny-graph.png" "$OUT/logs/tiny-plain.png" && \
     cmp -s "$OUT/logs/tiny-graph.png" "$OUT/logs/tiny-graph2.png"; then
    log "tiny: graph replay, plain runs and a second process give the same bytes"
  else
    fail "tiny-graph-equals-plain"
  fi
  log "tiny graph run: $(head -c 500 "$OUT/tiny-graph.json")"
  # The regional layout (pipeline/regional.h): the loop over layers captured as one CUDA graph
  # must give the plain loop's bytes; against the whole graph, bytes or max |diff| are reported.
  for v in rgraph:--cuda_graphs rplain:--nocuda_graphs; do
    "$BIN/kiln-run" --model "$WORK/flux-tiny" --package_dir "$WORK/packages-tiny" --device cuda \
      --precision bf16 --prompt "$PROMPT" --width 256 --height 256 --steps 4 --seed 7 \
      --compile_options '{"layout":"regional"}' \
      --profile_steps "${v#*:}" --out "$OUT/logs/tiny-${v%%:*}.png" --json \
      > "$OUT/tiny-${v%%:*}.json" 2> "$OUT/logs/tiny-${v%%:*}.err" \
      || { tail -20 "$OUT/logs/tiny-${v%%:*}.err"; fail "tiny-${v%%:*}"; }
  done
  cmp -s "$OUT/logs/tiny-rgraph.png" "$OUT/logs/tiny-rplain.png" \
    && log "tiny regional: graph replay and plain runs give the same bytes" \
    || fail "tiny-regional-graph-equals-plain"
  log "tiny regional vs whole: $($PY -c "
import numpy as np, sys
from PIL import Image
a = np.asarray(Image.open(sys.argv[1]), dtype=np.int16); b = np.asarray(Image.open(sys.argv[2]), dtype=np.int16)
print('byte-identical' if (a == b).all() else f'max |diff| {abs(a - b).max()}/255, mean {abs(a - b).mean():.4f}')
" "$OUT/logs/tiny-rgraph.png" "$OUT/logs/tiny-graph.png")"
  log "tiny regional graph run: $(head -c 500 "$OUT/tiny-rgraph.json")"
fi

if [ -n "${WEIGHTS_PID:-}" ]; then
  wait "$WEIGHTS_PID" || { tail -20 "$OUT/logs/devweights.err"; fail weights; }
  log "weights: $(cat "$OUT/devweights.json")"
fi

if has cold; then
  log "cold start, packages compiled on a miss (bf16 and fp8 concurrently, empty stores)"
  rm -rf "$SHARED" "$WORK"/local-*
  kiln_run cold-compiled-bf16 --precision bf16 --package_dir "$WORK/local-a-bf16" \
    --shared_dir "$SHARED" --profile_steps &
  p1=$!
  sleep 2
  kiln_run cold-compiled-fp8 --precision fp8 --package_dir "$WORK/local-a-fp8" \
    --shared_dir "$SHARED" --profile_steps &
  p2=$!
  wait $p1 || FAILED+=(cold-compiled-bf16)
  wait $p2 || FAILED+=(cold-compiled-fp8)
fi

if has baselines; then
  log "baselines: torch.compile cold start in fresh processes (empty, then warm Inductor cache)"
  rm -rf "$WORK/inductor-cache"
  for c in empty warm; do
    TORCHINDUCTOR_CACHE_DIR=$WORK/inductor-cache $PY bench/gpu/baselines.py --cold-start \
      --model "$MODEL" --out "$OUT/baselines" --height "$H" --width "$W" \
      > "$OUT/torch-compile-cold-$c.json" 2> "$OUT/logs/torch-compile-cold-$c.err" \
      || { tail -20 "$OUT/logs/torch-compile-cold-$c.err"; fail "torch-compile-cold-$c"; }
    log "torch.compile fresh process, $c cache: $(cat "$OUT/torch-compile-cold-$c.json")"
  done
  log "baselines: attention kernels, eager and regional torch.compile, bf16 and fp8"
  TORCHINDUCTOR_CACHE_DIR=$WORK/inductor-cache $PY bench/gpu/baselines.py --model "$MODEL" \
    --out "$WORK/baselines" --height "$H" --width "$W" --attention-bench --profile --iters 10 \
    > "$OUT/logs/baselines.log" 2>&1 || { tail -30 "$OUT/logs/baselines.log"; fail baselines; }
  cp "$WORK/baselines/baselines.json" "$OUT/baselines.json" 2>/dev/null
  grep '^{' "$OUT/logs/baselines.log" | cut -c1-400
fi

# precision:attention -> package tag (local-a-<tag>) and compile options of each variant.
VARIANTS=${VARIANTS:-bf16:cudnn fp8:cudnn fp8:fp8}
# A third field "regional" compiles the regional layout (kiln/regional.py: head, double block,
# single block and tail packages, weights as inputs), e.g. VARIANTS="bf16:cudnn bf16:cudnn:regional";
# kiln-bench runs it as the C++ pipeline does (pipeline/regional.h: the loop over layers, captured
# as one CUDA graph), so its step time and error sit beside the whole-graph variant's; the compile
# stage's compile-<tag>.json has the wall time of the miss (target ≤ 30 s for flux-dev).
# A field "fq" builds the fp8 transformer with fused quantization (compile option fused_quant,
# kiln/models/fused_quant.py), e.g. VARIANTS="fp8:fp8:regional fp8:fp8:regional:fq".
prec_of() { echo "${1%%:*}"; }
attn_of() { local r=${1#*:}; echo "${r%%:*}"; }
layout_of() { case ":$1:" in *:regional:*) echo regional ;; *) echo whole ;; esac; }
fq_of() { case ":$1:" in *:fq:*) echo 1 ;; *) echo 0 ;; esac; }
tag_of() { local p a l; p=$(prec_of "$1") a=$(attn_of "$1") l=$(layout_of "$1")
  local t=$p; [ "$a" = fp8 ] && t="$p-attn"; [ "$(fq_of "$1")" = 1 ] && t="$t-fq"
  [ "$l" = regional ] && t="$t-regional"; echo "$t"; }
options_of() { local l=""; [ "$(layout_of "$1")" = regional ] && l=',"layout":"regional"'
  [ "$(fq_of "$1")" = 1 ] && l="$l"',"fused_quant":true'
  echo "{\"attention\":\"$(attn_of "$1")\",\"max_autotune\":false$l}"; }

if has compile; then
  # In the background: the fp8 stage (GPU timings) runs meanwhile; waited for below.
  log "kiln-compile of the transformer on a miss, all of: $VARIANTS (concurrently, background)"
  pids=()
  for v in $VARIANTS; do
    tag=$(tag_of "$v")
    rm -rf "$WORK/local-a-$tag"
    ( t0=$(now)
      timeout "${COMPILE_TIMEOUT:-420}" "$BIN/kiln-compile" --model "$MODEL" --component transformer \
        --precision "$(prec_of "$v")" --height "$H" --width "$W" --text-len 512 --target cuda:sm_90 \
        --compile-options "$(options_of "$v")" --out-root "$WORK/local-a-$tag" \
        > "$OUT/logs/compile-$tag.manifest" 2> "$OUT/logs/compile-$tag.err"
      rc=$?
      echo "{\"variant\": \"$tag\", \"rc\": $rc, \"wall_s\": $(awk "BEGIN{print $(now) - $t0}")}" \
        > "$OUT/compile-$tag.json"
      exit $rc ) &
    pids+=($!)
  done
fi

if has fp8; then
  log "fp8_bench.py (${FP8_PARTS:-attention,gemm,block,step})"
  TORCHINDUCTOR_CACHE_DIR=$WORK/inductor-cache $PY bench/gpu/fp8_bench.py --model "$MODEL" \
    --out "$WORK/fp8" --height "$H" --width "$W" --parts "${FP8_PARTS:-attention,gemm,block,step}" \
    --step-variants "${FP8_STEP_VARIANTS:-bf16:cudnn,fp8:cudnn,fp8:fp8}" \
    --step-modes "${FP8_STEP_MODES:-eager,compile}" \
    > "$OUT/logs/fp8.log" 2>&1 || { grep -v Warning "$OUT/logs/fp8.log" | tail -30; fail fp8; }
  cp "$WORK/fp8/fp8.json" "$OUT/fp8.json" 2>/dev/null
  cp "$WORK/fp8/fp8.json" "$WORK/fp8"/*.safetensors "$DEST/" 2>/dev/null
fi

if has compile; then
  i=0
  for v in $VARIANTS; do
    tag=$(tag_of "$v")
    wait "${pids[$i]}" || { tail -5 "$OUT/logs/compile-$tag.err"; fail "compile-$tag"; }
    log "compiled $tag: $(cat "$OUT/compile-$tag.json")"
    i=$((i + 1))
  done
fi

if has kiln; then
  REFS=${REFS:-$([ -f "$WORK/fp8/inputs.safetensors" ] && echo "$WORK/fp8" || echo "$WORK/baselines")}
  FLOP=$($PY -c "
import json,sys
sys.path.insert(0, 'bench/gpu')
import baselines as B
from kiln import components as C
c = C.read_component_config('$MODEL', 'transformer')
print(B.flops_per_step(c, ($H // 16) * ($W // 16), 512)['total'])" 2>/dev/null || echo 0)
  for v in $VARIANTS; do
    tag=$(tag_of "$v")
    [ -d "$WORK/local-a-$tag" ] || continue
    if [ "$(layout_of "$v")" = regional ] && [ "${REGIONAL_PY:-0}" = 1 ]; then
      # REGIONAL_PY=1: also whole-graph against regional through PyTorch's AOTI loader, same
      # weights and inputs (bench/gpu/regional_bench.py); kiln-bench below runs the set in C++.
      wtag=${tag%-regional}
      if [ -d "$WORK/local-a-$wtag" ]; then
        log "regional_bench $tag against $wtag"
        $PY bench/gpu/regional_bench.py --model "$MODEL" --whole "$WORK/local-a-$wtag" \
          --regional "$WORK/local-a-$tag" --precision "$(prec_of "$v")" --height "$H" --width "$W" \
          --iters 20 > "$OUT/regional-bench-$tag.json" 2> "$OUT/logs/regional-bench-$tag.err" \
          || { tail -20 "$OUT/logs/regional-bench-$tag.err"; fail "regional-bench-$tag"; }
        log "regional_bench $tag: $(head -c 900 "$OUT/regional-bench-$tag.json")"
      fi
    fi
    log "kiln-bench $tag (references in $REFS)"
    "$BIN/kiln-bench" --model "$MODEL" --package_dir "$WORK/local-a-$tag" --precision "$(prec_of "$v")" \
      --compile_options "$(options_of "$v")" \
      --width "$W" --height "$H" --inputs "$REFS/inputs.safetensors" --flop "$FLOP" \
      --reference "$REFS/ref-eager-bf16.safetensors,$REFS/ref-eager-${tag%-regional}.safetensors" \
      --iters 20 > "$OUT/kiln-bench-$tag.json" 2> "$OUT/logs/kiln-bench-$tag.err" \
      || { tail -20 "$OUT/logs/kiln-bench-$tag.err"; fail "kiln-bench-$tag"; }
    log "kiln-bench $tag: $(head -c 900 "$OUT/kiln-bench-$tag.json")"
  done
fi

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; }

if has warm; then
  log "disk read ceiling: dd of the transformer checkpoint, page cache dropped (1 and 4 streams)"
  CK=$MODEL/transformer/diffusion_pytorch_model.safetensors
  if drop_caches; then
    t0=$(now); dd if="$CK" of=/dev/null bs=64M count=96 2>/dev/null; t1=$(now)
    drop_caches
    t2=$(now)
    for i in 0 1 2 3; do dd if="$CK" of=/dev/null bs=64M count=24 skip=$((i * 24)) 2>/dev/null & done
    wait; t3=$(now)
    awk "BEGIN{printf \"{\\\"one_stream_GBps\\\": %.2f, \\\"four_streams_GBps\\\": %.2f, \\\"bytes\\\": %.0f}\", 6.442450944/($t1-$t0), 6.442450944/($t3-$t2), 6442450944}" > "$OUT/disk-read.json"
    log "disk: $(cat "$OUT/disk-read.json")"
  else
    log "disk: cannot drop the page cache here; no cold-disk figures"
  fi
  for prec in bf16 fp8; do
    if drop_caches; then DROPPED=1; else DROPPED=0; fi
    echo "$DROPPED" > "$OUT/page-cache-dropped-$prec"
    log "cold start, packages in the shared store ($prec; page cache dropped: $DROPPED)"
    rm -rf "$WORK/local-b-$prec"
    kiln_run "cold-shared-$prec" --precision $prec --package_dir "$WORK/local-b-$prec" \
      --shared_dir "$SHARED" --nocompile
    log "cold start, packages in the shared store ($prec; page cache warm)"
    rm -rf "$WORK/local-b-$prec"
    kiln_run "cold-sharedwarm-$prec" --precision $prec --package_dir "$WORK/local-b-$prec" \
      --shared_dir "$SHARED" --nocompile
    log "end to end, 28 steps, fresh process, packages local ($prec)"
    kiln_run "e2e-$prec" --precision $prec --package_dir "$WORK/local-b-$prec" --nocompile \
      --profile_steps
  done
fi

# On request (not in the default list): Inductor autotuning, measured against the default
# packages of this run (needs the cold, baselines and kiln stages' outputs in $WORK).
if has lora; then
  if [ ! -f "$WORK/loras/rank64.safetensors" ]; then
    log "LoRA: rank-64 LoRA on every attention and MLP projection of flux-dev in $WORK/loras"
    $PY -m kiln.make_lora make --model "$MODEL" --out "$WORK/loras" --name rank64 --layout peft \
      --rank 64 --dtype bfloat16 --targets attention,mlp > "$OUT/logs/lora-make.log" 2>&1 ||
      fail lora-make
  fi
  for p in bf16 fp8; do
    kiln_run "lora-$p" --precision "$p" --shared_dir "$SHARED" --package_dir "$WORK/packages-lora" \
      --lora rank64 --lora_dir "$WORK/loras" --lora_switches 6 --steps 4
  done
  # The switch as it was (merge and swap at the denoise), for the split above.
  kiln_run "lora-bf16-at-switch" --precision bf16 --shared_dir "$SHARED" \
    --package_dir "$WORK/packages-lora" --lora rank64 --lora_dir "$WORK/loras" --lora_switches 6 \
    --steps 4 --nolora_prepare_ahead
fi

if has autotune; then
  AT='{"attention":"cudnn","max_autotune":true}'
  for prec in ${AUTOTUNE_PRECISIONS:-bf16 fp8}; do
    log "autotune: compiling the $prec transformer with $AT"
    t0=$(now)
    timeout "${AUTOTUNE_TIMEOUT:-400}" "$BIN/kiln-compile" --model "$MODEL" --component transformer \
      --precision $prec --height "$H" --width "$W" --text-len 512 --target cuda:sm_90 \
      --compile-options "$AT" --out-root "$WORK/local-at-$prec" > "$OUT/logs/autotune-$prec.manifest" \
      2> "$OUT/logs/autotune-$prec.err" || { tail -5 "$OUT/logs/autotune-$prec.err"; fail "autotune-compile-$prec"; continue; }
    log "autotune $prec compiled in $(awk "BEGIN{print $(now) - $t0}") s"
    "$BIN/kiln-bench" --model "$MODEL" --package_dir "$WORK/local-at-$prec" --precision $prec \
      --width "$W" --height "$H" --inputs "$WORK/baselines/inputs.safetensors" --compile_options "$AT" \
      --reference "$WORK/baselines/ref-eager-bf16.safetensors,$WORK/baselines/ref-eager-$prec.safetensors" \
      --iters 20 > "$OUT/kiln-bench-autotune-$prec.json" 2> "$OUT/logs/kiln-bench-autotune-$prec.err" \
      || { tail -20 "$OUT/logs/kiln-bench-autotune-$prec.err"; fail "kiln-bench-autotune-$prec"; }
    log "autotune $prec: $(head -c 600 "$OUT/kiln-bench-autotune-$prec.json")"
  done
fi

# On request: other buckets (BUCKETS, default 512x512 768x768), bf16, compiled on a miss into
# the shared store, then generated again with the packages found (step times, graph on/off).
if has buckets; then
  for b in ${BUCKETS:-512x512 768x768}; do
    for run in compiled found nograph; do
      flag=--cuda_graphs; [ $run = nograph ] && flag=--nocuda_graphs
      BUCKET=$b W=${b%x*} H=${b#*x} kiln_run "bucket-$b-$run" --precision bf16 \
        --package_dir "$WORK/local-a-bf16" --shared_dir "$SHARED" --profile_steps $flag
    done
  done
fi

$PY bench/gpu/summarize.py "$OUT" > "$OUT/table.txt" || fail summarize
if has fp8 || has compile; then
  grep -v Warning "$OUT/logs/fp8.log" 2>/dev/null | sed -n '/^fp8 attention config/,$p' >> "$OUT/table.txt"
  cat "$OUT"/compile-*.json >> "$OUT/table.txt" 2>/dev/null
fi
cp "$OUT/bench.json" "$OUT/table.txt" "$DEST/" 2>/dev/null
tar czf "$DEST/run-files.tgz" --exclude='*.png' -C "$OUT" . && cp "$OUT/logs/tiny-graph.png" "$DEST/" 2>/dev/null
cat "$OUT/table.txt"
if [ ${#FAILED[@]} -gt 0 ]; then log "failed stages: ${FAILED[*]}"; exit 1; fi
log "done; outputs in $OUT"
