#!/usr/bin/env bash
# Cold start of a multi-GPU node's weights (issue 15, item 3; docs/multi_gpu.md "Weight
# broadcast"): the transformer checkpoint loaded onto GPUS devices three ways, side by side in
# one run, each from a cold page cache:
#   single       one process, one read onto cuda:0 (a 1-GPU node today)
#   independent  GPUS processes at once, each reading the checkpoint onto its own GPU (a host of
#                1-GPU nodes today)
#   broadcast    GPUS ranks of one group: rank 0 reads once, NCCL broadcasts to the others
#                (parallel::BroadcastWeights)
# Every process is kiln-broadcast-bench (bench/broadcast_bench.cc): --world 1 is an independent
# read through the same code. Per mode: wall seconds from launch to the last process's exit
# (process start, CUDA init and group setup included) and every process's JSON line (read +
# broadcast seconds, GB/s). The page cache is dropped for the checkpoint's files before each
# mode (posix_fadvise DONTNEED: needs no root; pages other processes have mapped stay).
#
#   bench/gpu/broadcast.sh OUTDIR
# Environment:
#   BIN      folder holding kiln-broadcast-bench (default build/bin)
#   MODEL    model repository (default OUTDIR/model, made with kiln.make_synthetic if absent)
#   CONFIG   make_synthetic's config (flux-dev); LAYERS DOUBLE,SINGLE for a smaller checkpoint
#            of the same shapes (the CPU dry run: 1,2)
#   GPUS     devices / ranks (4); DEVICE cuda (NCCL) or cpu (gloo: the dry run)
#   MODES    which modes, in order (single independent broadcast)
#   PY       python with torch (.venv/bin/python, else python3)
# Writes OUTDIR/broadcast.json (every figure) and prints a table.
set -euo pipefail
OUT=${1:?usage: $0 OUTDIR}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${BIN:-$ROOT/build/bin}
MODEL=${MODEL:-$OUT/model}
CONFIG=${CONFIG:-flux-dev}
GPUS=${GPUS:-4}
DEVICE=${DEVICE:-cuda}
MODES=${MODES:-single independent broadcast}
PY=${PY:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3
TOOL=$BIN/kiln-broadcast-bench
[ -x "$TOOL" ] || { echo "no $TOOL: build the kiln-broadcast-bench target" >&2; exit 2; }
mkdir -p "$OUT"
export PYTHONPATH=$ROOT/pipeline/python${PYTHONPATH:+:$PYTHONPATH}

if [ ! -d "$MODEL/transformer" ]; then
  echo "[broadcast] writing a synthetic $CONFIG transformer${LAYERS:+ ($LAYERS blocks)} to $MODEL"
  gen_device=$DEVICE; [ "$DEVICE" = cuda ] && gen_device=cuda
  "$PY" -m kiln.make_synthetic "$MODEL" --config "$CONFIG" --device "$gen_device" --dtype bf16 \
      --components transformer ${LAYERS:+--transformer-layers "$LAYERS"}
fi

evict() {
  "$PY" - "$MODEL/transformer" <<'PYEOF'
import glob, os, sys
for path in glob.glob(os.path.join(sys.argv[1], "*.safetensors")):
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
PYEOF
}

device_of() { if [ "$DEVICE" = cpu ]; then echo cpu; else echo "cuda:$1"; fi; }

# run_mode NAME WORLD COUNT: COUNT processes; WORLD 1 = independent reads, else ranks of a group.
run_mode() {
  local name=$1 world=$2 count=$3 pids=() rc=0
  local port_file=$OUT/$name.port
  rm -f "$port_file" "$OUT"/$name-*.json "$OUT"/$name-*.log
  evict
  local start=$(date +%s.%N)
  for ((r = 0; r < count; r++)); do
    local rank=$r; [ "$world" = 1 ] && rank=0
    "$TOOL" --model "$MODEL" --world "$world" --rank "$rank" --port_file "$port_file" \
        --device "$(device_of $r)" --timeout 600 >"$OUT/$name-$r.json" 2>"$OUT/$name-$r.log" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
  local end=$(date +%s.%N)
  [ $rc = 0 ] || { echo "[broadcast] $name failed: see $OUT/$name-*.log" >&2; tail -3 "$OUT"/$name-*.log >&2; exit 1; }
  echo "$name $world $count $start $end" >>"$OUT/modes.txt"
}

rm -f "$OUT/modes.txt"
for mode in $MODES; do
  case $mode in
    single) run_mode single 1 1 ;;
    independent) run_mode independent 1 "$GPUS" ;;
    broadcast) run_mode broadcast "$GPUS" "$GPUS" ;;
    *) echo "unknown mode $mode" >&2; exit 2 ;;
  esac
done

"$PY" - "$OUT" "$DEVICE" "$GPUS" <<'PYEOF'
import json, os, sys
out, device, gpus = sys.argv[1], sys.argv[2], int(sys.argv[3])
modes = {}
for line in open(os.path.join(out, "modes.txt")):
    name, world, count, start, end = line.split()
    ranks = [json.loads(open(os.path.join(out, f"{name}-{r}.json")).read()) for r in range(int(count))]
    modes[name] = {"world": int(world), "processes": int(count),
                   "wall_seconds": round(float(end) - float(start), 3), "ranks": ranks}
summary = {"device": device, "gpus": gpus, "bytes": next(iter(modes.values()))["ranks"][0]["bytes"],
           "modes": modes}
if "single" in modes and "broadcast" in modes:
    summary["broadcast_over_single"] = round(modes["broadcast"]["wall_seconds"] / modes["single"]["wall_seconds"], 3)
if "independent" in modes and "broadcast" in modes:
    summary["independent_over_broadcast"] = round(modes["independent"]["wall_seconds"] / modes["broadcast"]["wall_seconds"], 3)
json.dump(summary, open(os.path.join(out, "broadcast.json"), "w"), indent=2)
print(f"{summary['bytes'] / 1e9:.2f} GB checkpoint, {gpus} x {device}")
print(f"{'mode':<12} {'wall s':>8} {'load s (per process)':>28} {'GB/s (per process)':>28}")
for name, m in modes.items():
    loads = " ".join(f"{r['seconds']:.2f}" for r in m["ranks"])
    rates = " ".join(f"{r['gbps']:.2f}" for r in m["ranks"])
    print(f"{name:<12} {m['wall_seconds']:>8.2f} {loads:>28} {rates:>28}")
for k in ("broadcast_over_single", "independent_over_broadcast"):
    if k in summary:
        print(f"{k}: {summary[k]}")
PYEOF
