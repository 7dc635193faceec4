#!/usr/bin/env bash
# Where a fresh Python process's imports go on the GPU host (issue 13's compile on a miss: each
# region worker spends ~15 s importing torch, kiln.models and Inductor there, against ~1 s for
# torch alone on the development machine). Times `import torch`, then torch + Inductor's
# compile_fx + kiln.models: once as is, then twice with bytecode written to a private cache
# (PYTHONDONTWRITEBYTECODE unset, PYTHONPYCACHEPREFIX set: the second round shows what cached
# bytecode saves where the installed packages' __pycache__ is missing or read-only). Prints whether
# bytecode is written and where torch lives. Usage: bench/gpu/import_probe.sh [PYCACHE_DIR]
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
PYC=${1:-${KILN_GPU_WORK:-/tmp}/pycache-probe}
export PYTHONPATH="$PWD/pipeline/python${PYTHONPATH:+:$PYTHONPATH}"
TIMEFORMAT='%R'
probe() {  # label rounds env... : wall seconds of each import set
  local label=$1 rounds=$2; shift 2
  for what in "import torch" "import torch, torch._inductor.compile_fx, kiln.models"; do
    for round in $(seq "$rounds"); do
      t=$( { time env "$@" $PY -c "$what" > /dev/null 2>&1; } 2>&1 )
      echo "$label | $what | round $round | ${t} s"
    done
  done
}
$PY - <<'PY'
import os, sys, sysconfig
import torch
d = os.path.dirname(torch.__file__)
print("python", sys.version.split()[0], "dont_write_bytecode", sys.dont_write_bytecode,
      "PYTHONDONTWRITEBYTECODE", os.environ.get("PYTHONDONTWRITEBYTECODE"))
print("torch", torch.__version__, d, "writable", os.access(d, os.W_OK),
      "has __pycache__", os.path.isdir(os.path.join(d, "__pycache__")),
      "pyc files under torch/_inductor", sum(1 for _ in os.scandir(os.path.join(d, "_inductor", "__pycache__")))
      if os.path.isdir(os.path.join(d, "_inductor", "__pycache__")) else 0)
print("cpus", os.cpu_count(), "affinity", len(os.sched_getaffinity(0)))
PY
probe "as is" 1 A=1
probe "bytecode written to a prefix" 2 -u PYTHONDONTWRITEBYTECODE PYTHONPYCACHEPREFIX="$PYC"
