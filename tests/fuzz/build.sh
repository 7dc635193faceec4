#!/usr/bin/env bash
# Configures (once) and builds the sanitizer + fuzz build: clang, KILN_WITH_TORCH=OFF,
# KILN_FUZZ=ON (ASan + UBSan everywhere, libFuzzer coverage). It holds the LibTorch-free
# libraries, their GoogleTest tests (run by ctest in it) and the libFuzzer targets (BUILD/fuzz/).
#
#   tests/fuzz/build.sh BUILD [NINJA TARGET...]
#
# KILN_FUZZ_OPT (default -O2, what fuzzing campaigns want) is the optimization level; `make test`
# builds -O0: under ASan its compile takes a third to a half of -O2's (user CPU, one file at a
# time: coordinator_test.cc 56.7 -> 18.4 s, kiln.pb.cc 39.2 -> 12.6 s, coordinator.cc 40.0 ->
# 19.4 s) and its tests still run in about 100 s. The build type stays
# RelWithDebInfo (NDEBUG, as Debian's Abseil was built). A BUILD configured with another level is
# reconfigured, and so rebuilt.
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD=${1:?usage: build.sh BUILD [TARGET...]}
shift
PY=${KILN_PYTHON:-$PWD/.venv/bin/python}
FLAGS="${KILN_FUZZ_OPT:--O2} -g -DNDEBUG"
if [ ! -f "$BUILD/build.ninja" ] ||
   ! grep -qx "CMAKE_CXX_FLAGS_RELWITHDEBINFO:STRING=$FLAGS" "$BUILD/CMakeCache.txt" 2>/dev/null; then
  cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_C_FLAGS_RELWITHDEBINFO="$FLAGS" -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="$FLAGS" \
    -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ \
    -DKILN_WITH_TORCH=OFF -DKILN_FUZZ=ON -DKILN_PYTHON="$PY" >/dev/null
fi
cmake --build "$BUILD" -- -j"${KILN_BUILD_JOBS:-$(nproc)}" "$@"
