#!/usr/bin/env bash
# One invocation on the GPU test host: build kiln against the host's torch (CUDA), run the
# GPU-labelled checks and the benchmarks, write OUTDIR/bench.json and logs, print a table last.
#
#   bench/gpu/run.sh OUTDIR [STAGES]     STAGES: comma list, default "build,tiny"
#
# The host has no package registry: the Debian libraries travel unpacked in .device-deps/
# (../shared/fetch-debs.sh; see bench/README.md). Everything it writes stays under OUTDIR and
# /tmp/kiln-gpu (build tree, models, packages).
set -euo pipefail
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
STAGES=${2:-build,tests,tiny}
cd "$(dirname "$0")/../.."
ROOT=$PWD
WORK=${KILN_GPU_WORK:-/tmp/kiln-gpu}
mkdir -p "$WORK"
DEPS=$ROOT/.device-deps
PY=${PYTHON:-python3}
export LD_LIBRARY_PATH=$DEPS/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PATH=$DEPS/usr/bin:$PATH
export PKG_CONFIG_SYSROOT_DIR=$DEPS
export PKG_CONFIG_PATH=$DEPS/usr/lib/x86_64-linux-gnu/pkgconfig:$DEPS/usr/share/pkgconfig
export PYTHONPATH=$ROOT/pipeline/python${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
has() { [[ ",$STAGES," == *",$1,"* ]]; }
log() { echo "[gpu $(date +%H:%M:%S)] $*"; }

log "host: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo no-gpu)"
log "torch: $($PY -c 'import torch;print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))')"

if has build; then
  log "configure + build (Release) in $WORK/build"
  start=$(date +%s)
  cmake -S . -B "$WORK/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DKILN_PYTHON="$(command -v $PY)" \
    -DCMAKE_PREFIX_PATH="$($PY -c 'import torch.utils;print(torch.utils.cmake_prefix_path)');$DEPS/usr" \
    -DCMAKE_CUDA_ARCHITECTURES=90 -DTORCH_CUDA_ARCH_LIST=9.0 > "$OUT/configure.log" 2>&1 \
    || { tail -40 "$OUT/configure.log"; exit 1; }
  cmake --build "$WORK/build" -j"$(nproc)" --target kiln-run pipeline_tokenizer_test \
    pipeline_safetensors_test pipeline_scheduler_test pipeline_png_test cache_artifact_key_test \
    pipeline_weights_test \
    > "$OUT/build.log" 2>&1 || { grep -E "error|Error" "$OUT/build.log" | head -40; exit 1; }
  log "built in $(( $(date +%s) - start )) s"
fi
BIN=$WORK/build/bin

if has tiny; then
  log "flux-tiny on cuda: kiln-run bf16 and fp32, compile then reuse"
  rm -rf "$WORK/flux-tiny" && $PY -m kiln.make_tiny "$WORK/flux-tiny" --seed 0 > /dev/null
  for prec in bf16 fp32; do
    for run in 1 2; do
      "$BIN/kiln-run" --model "$WORK/flux-tiny" --package_dir "$WORK/packages-tiny" --device cuda \
        --precision $prec --prompt "a lighthouse on a cliff at dusk" --width 256 --height 256 \
        --steps 4 --seed 7 --out "$OUT/tiny-$prec-$run.png" --json > "$OUT/tiny-$prec-$run.json" 2> "$OUT/tiny-$prec-$run.err" \
        || { cat "$OUT/tiny-$prec-$run.err"; exit 1; }
      log "tiny $prec run $run: $(cat "$OUT/tiny-$prec-$run.json")"
    done
    cmp "$OUT/tiny-$prec-1.png" "$OUT/tiny-$prec-2.png" && log "tiny $prec: same seed, same bytes"
  done
fi
if has tests; then
  log "C++ tests on the GPU host (the fixture-free ones; weights_test runs its CUDA case here)"
  (cd "$WORK/build" && ctest -R "tokenizer|safetensors|scheduler|png|artifact_key|weights" --output-on-failure > "$OUT/ctest.log" 2>&1) \
    && log "ctest passed" || { log "ctest FAILED"; grep -E "Failed|SEGFAULT|FAILED" "$OUT/ctest.log" | head;
      cuda-gdb -batch -ex run -ex bt --args "$WORK/build/tests/pipeline_png_test" > "$OUT/gdb.log" 2>&1 || true
      grep -A25 "SIGSEGV" "$OUT/gdb.log" | head -40; }
fi

if has devweights; then
  log "flux-dev with synthetic bf16 weights (generated on the GPU) in $WORK/flux-dev"
  $PY -m kiln.make_synthetic "$WORK/flux-dev" --config flux-dev --device cuda --dtype bf16 \
    > "$OUT/devweights.json" 2> "$OUT/devweights.err" || { tail -20 "$OUT/devweights.err"; exit 1; }
  log "weights: $(cat "$OUT/devweights.json")"
  du -sh "$WORK/flux-dev"/* | sed 's/^/    /'
fi

if has dev; then
  for prec in ${DEV_PRECISIONS:-bf16}; do
    for spec in "first 4" "again 28"; do
      set -- $spec
      "$BIN/kiln-run" --model "$WORK/flux-dev" --package_dir "$WORK/packages-dev" --device cuda \
        --precision $prec --prompt "a lighthouse on a cliff at dusk" --width 1024 --height 1024 \
        --steps $2 --seed 7 --out "$OUT/dev-$prec-$1.png" --json \
        > "$OUT/dev-$prec-$1.json" 2> "$OUT/dev-$prec-$1.err" || { tail -30 "$OUT/dev-$prec-$1.err"; exit 1; }
      log "flux-dev 1024x1024 $prec $1 ($2 steps): $(cat "$OUT/dev-$prec-$1.json")"
    done
  done
fi
log "done; outputs in $OUT"
