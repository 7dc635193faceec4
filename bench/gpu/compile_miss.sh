#!/usr/bin/env bash
# Issue 13's compile-time target (the flux-dev transformer compiled on a miss in <= 30 s): the
# regional layout compiled by kiln-compile, every child process it starts recorded
# (bench/gpu/trace_children/), in cases run one after the other, nothing else on the machine:
#
#   bench/gpu/compile_miss.sh OUTDIR     # OUTDIR: table.txt, <case>.json, <case>-children.json
#
#   cold:SIZE   empty Inductor, Triton and bytecode caches: a node's first compile ever (its
#               toolchain's caches too are cold)
#   warm:SIZE   the caches the cases before it filled, kept: a new resolution bucket on a node
#               that has compiled before (no kernel or graph of this bucket is cached, but
#               Inductor's and Triton's per-host work — ISA probe, launchers, headers — is)
# A case may add a third field, VAR=VALUE[,VAR=VALUE] set for it alone (a variant: e.g.
# cold:1024:TORCHINDUCTOR_COMPILE_THREADS=4). MISS_CASES (default "cold:1024 warm:768"), PRECISION (bf16), TARGET (cuda:sm_90), COMPILE_OPTIONS (the regional
# layout with kiln's other defaults), KILN_GPU_WORK (build and model, bench/gpu/run.sh prep),
# MISS_CACHES (a directory for the caches, kept after the run; default a temporary one, removed),
# TRACE_SAMPLE (seconds between stack samples of every traced process, default 0.25; 0: none).
set -uo pipefail
source "$(dirname "$0")/env.sh"  # DEST ROOT WORK BIN MODEL PY, the .device-deps libraries
PRECISION=${PRECISION:-bf16}
OPTIONS=${COMPILE_OPTIONS:-'{"attention":"cudnn","max_autotune":false,"layout":"regional"}'}
log() { echo "[compile-miss $(date +%H:%M:%S)] $*" | tee -a "$DEST/compile-miss.log"; }
if [ -n "${MISS_CACHES:-}" ]; then  # kept, so that a later run's warm case finds them
  CACHES=$(mkdir -p "$MISS_CACHES" && cd "$MISS_CACHES" && pwd)
else
  CACHES=$(mktemp -d)
  trap 'rm -rf "$CACHES"' EXIT
fi
export TORCHINDUCTOR_CACHE_DIR=$CACHES/inductor TRITON_CACHE_DIR=$CACHES/triton
# kiln-compile's Python bytecode cache (kiln.region_workers.bytecode_cache; used where torch is
# installed without bytecode, as on the GPU test host): emptied by a cold case like the others.
export KILN_PYCACHE=${KILN_PYCACHE:-$CACHES/pycache}
log "$PRECISION $OPTIONS; cases ${MISS_CASES:-cold:1024 warm:768}; $(nproc) CPUs; host: \
$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo no-gpu)"
for case in ${MISS_CASES:-cold:1024 warm:768}; do
  # KIND:SIZE[:VAR=VALUE,...] — the third field, environment for this case only (a variant to
  # compare, e.g. cold:1024:TORCHINDUCTOR_COMPILE_THREADS=4)
  IFS=: read -r kind size extra <<< "$case"
  name=$kind-$size${extra:+-${extra//[^A-Za-z0-9]/_}}
  IFS=, read -r -a case_env <<< "${extra:-}"
  [ "$kind" = cold ] && rm -rf "$CACHES/inductor" "$CACHES/triton" "$CACHES/pycache"
  trace=$DEST/$name-children
  rm -rf "$trace" "$DEST/packages-$name"
  mkdir -p "$trace"
  t0=$(date +%s.%N)
  env "${case_env[@]}" KILN_TRACE_CHILDREN=$trace KILN_TRACE_SAMPLE=${TRACE_SAMPLE:-0.25} \
    PYTHONPATH=$ROOT/bench/gpu/trace_children${PYTHONPATH:+:$PYTHONPATH} timeout 900 "$BIN/kiln-compile" --model "$MODEL" --component transformer \
    --precision "$PRECISION" --height "$size" --width "$size" --text-len 512 \
    --target "${TARGET:-cuda:sm_90}" --compile-options "$OPTIONS" --out-root "$DEST/packages-$name" \
    > "$DEST/$name.manifest" 2> "$DEST/$name.err"
  rc=$?
  wall=$(awk "BEGIN{print $(date +%s.%N) - $t0}")
  $PY bench/gpu/trace_children/summary.py "$trace" --json "$DEST/$name-children.json" \
    > "$DEST/$name-children.txt"
  $PY - "$DEST" "$name" "$rc" "$wall" <<'EOF_CASE'
import json, sys
dest, name, rc, wall = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
out = {"case": name, "rc": rc, "wall_s": round(wall, 2), "regions": {}}
try:
    m = json.loads(open(f"{dest}/{name}.manifest").read().strip().splitlines()[-1])
    out["kiln_compile_total_s"] = m.get("total_seconds")
    for region, e in m.get("regions", {}).items():
        out["regions"][region] = {k: e.get(k) for k in ("export_seconds", "compile_seconds")}
except (OSError, ValueError, IndexError) as e:
    out["manifest_error"] = str(e)
json.dump(out, open(f"{dest}/{name}.json", "w"), indent=1)
EOF_CASE
  log "$name: rc $rc, wall $wall s; $(head -c 600 "$DEST/$name.json" | tr -d '\n ')"
  head -8 "$DEST/$name-children.txt" | tee -a "$DEST/compile-miss.log"
  rm -rf "$DEST/packages-$name"
  [ "$rc" = 0 ] || tail -20 "$DEST/$name.err" | tee -a "$DEST/compile-miss.log"
done
