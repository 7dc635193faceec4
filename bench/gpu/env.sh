# Sourced by the GPU-host scripts that work on bench/gpu/chain.sh's prep (batch.sh, stream.sh,
# compile_miss.sh), with OUTDIR as $1: makes OUTDIR and sets DEST to its absolute path, moves to
# the repository root (ROOT), and sets WORK (KILN_GPU_WORK, default build-gpu), BIN and MODEL
# (the prep's build and flux-dev, each overridable) and PY (PYTHON, default python3). Where the
# Debian libraries of the host's build travelled (.device-deps, bench/gpu/run.sh), they go on
# LD_LIBRARY_PATH and PATH.
DEST=$(mkdir -p "$1" && cd "$1" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
ROOT=$PWD
WORK=${KILN_GPU_WORK:-$ROOT/build-gpu}
BIN=${BIN:-$WORK/build/bin}
MODEL=${MODEL:-$WORK/flux-dev}
PY=${PYTHON:-python3}
if [ -d "$ROOT/.device-deps" ]; then
  export LD_LIBRARY_PATH=$ROOT/.device-deps/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  export PATH=$ROOT/.device-deps/usr/bin:$PATH
fi
