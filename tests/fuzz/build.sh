#!/usr/bin/env bash
# Configures (once) and builds the sanitizer + fuzz build: clang, KILN_WITH_TORCH=OFF,
# KILN_FUZZ=ON (ASan + UBSan everywhere, libFuzzer coverage). It holds the LibTorch-free
# libraries, their GoogleTest tests (run by ctest in it) and the libFuzzer targets (BUILD/fuzz/).
#
#   tests/fuzz/build.sh BUILD [NINJA TARGET...]
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD=${1:?usage: build.sh BUILD [TARGET...]}
shift
PY=${KILN_PYTHON:-$PWD/.venv/bin/python}
if [ ! -f "$BUILD/build.ninja" ]; then
  cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ \
    -DKILN_WITH_TORCH=OFF -DKILN_FUZZ=ON -DKILN_PYTHON="$PY" >/dev/null
fi
cmake --build "$BUILD" -- -j"${KILN_BUILD_JOBS:-$(nproc)}" "$@"
