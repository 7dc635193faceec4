#!/usr/bin/env bash
# `make test`: builds fixtures once (the seeded flux-tiny repository and its compiled packages,
# shared by every test of the run), then runs the C++ tests (ctest) and the Python tests (pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=$(cd "${1:-build}" && pwd)
export KILN_TESTDATA=$BUILD/testdata
export KILN_BIN=$BUILD/bin
export KILN_SOURCE=$PWD
export KILN_PYTHON=$PWD/.venv/bin/python
export PYTHONPATH=$PWD/pipeline/python${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$KILN_TESTDATA"

# timed LABEL COMMAND...: runs it and prints its wall time and its processes' CPU time, so that
# CI's log says where a run's time goes (a step's user + sys over its wall is how many cores it
# kept busy).
timed() {
  local TIMEFORMAT="[test] $1: %0R s wall, %0U s user + %0S s sys"
  shift
  time "$@"
}

echo "[test] fixture: seeded flux-tiny repository in $KILN_TESTDATA/flux-tiny"
rm -rf "$KILN_TESTDATA/flux-tiny"
"$KILN_PYTHON" -m kiln.make_tiny "$KILN_TESTDATA/flux-tiny" --seed 0

echo "[test] fixture: compiling flux-tiny packages (256x256, fp32, cpu) into"
echo "[test]   $KILN_TESTDATA/packages"
rm -rf "$KILN_TESTDATA/packages"
timed "fixture packages" "$KILN_BIN/kiln-run" --model "$KILN_TESTDATA/flux-tiny" \
  --package_dir "$KILN_TESTDATA/packages" --prompt "a lighthouse on a cliff at dusk" \
  --width 256 --height 256 --steps 4 --seed 7 \
  --out "$KILN_TESTDATA/first.png" --json > "$KILN_TESTDATA/first.json"
echo "[test] fixture: $(cat "$KILN_TESTDATA/first.json")"

# A copy of the packages (tests count the ones in packages/), where only the transformer compiles:
# the same image with the regional transformer layout. (Made one after the other: each compile
# keeps about two cores busy already; at once the two took 91 s against 77.)
echo "[test] fixture: the regional transformer layout into $KILN_TESTDATA/packages-regional"
rm -rf "$KILN_TESTDATA/packages-regional"
cp -r "$KILN_TESTDATA/packages" "$KILN_TESTDATA/packages-regional"
timed "regional fixture" "$KILN_BIN/kiln-run" --model "$KILN_TESTDATA/flux-tiny" \
  --package_dir "$KILN_TESTDATA/packages-regional" \
  --prompt "a lighthouse on a cliff at dusk" --width 256 --height 256 --steps 4 --seed 7 \
  --compile_options '{"layout":"regional"}' \
  --out "$KILN_TESTDATA/first-regional.png" --json > "$KILN_TESTDATA/first-regional.json"
echo "[test] regional fixture: $(cat "$KILN_TESTDATA/first-regional.json")"

# Another copy, where the batch-2 transformer and VAE decoder compile: two jobs (seeds 7 and 8)
# denoised as one batch (FluxPipeline::DenoiseDecodeBatch); the batch tests use these packages.
echo "[test] fixture: a batch of 2 (batch-2 transformer and VAE) into $KILN_TESTDATA/packages-batch"
rm -rf "$KILN_TESTDATA/packages-batch"
cp -r "$KILN_TESTDATA/packages" "$KILN_TESTDATA/packages-batch"
timed "batch fixture" "$KILN_BIN/kiln-run" --model "$KILN_TESTDATA/flux-tiny" \
  --package_dir "$KILN_TESTDATA/packages-batch" \
  --prompt "a lighthouse on a cliff at dusk" --width 256 --height 256 --steps 4 --seed 7 \
  --batch 2 --out "$KILN_TESTDATA/batch.png" --json > "$KILN_TESTDATA/batch.json"

echo "[test] C++ tests (ctest)"
timed "C++ tests passed" ctest --test-dir "$BUILD" --output-on-failure -j2

# The sanitizer build (the LibTorch-free libraries again with clang + ASan + UBSan, at -O0: a
# third of -O2's compile time under ASan, tests/fuzz/build.sh) needs nothing from the tests, so
# it compiles beside pytest at nice 19, on the cores pytest leaves idle (most of its tests wait
# on processes, sockets and timers; a test's own processes, at nice 0, take a core from it at
# once). Its tests and every libFuzzer target for a few seconds run after pytest
# (tests/fuzz/README.md). KILN_TEST_SANITIZE=0 skips all of it.
SANITIZE=${KILN_TEST_SANITIZE:-1}
FUZZ_BUILD=$BUILD-fuzz
sanitizer_pid=""
if [ "$SANITIZE" != 0 ]; then
  echo "[test] sanitizer build (ASan + UBSan, no LibTorch) in $FUZZ_BUILD, beside pytest at nice 19"
  echo "[test]   (its log: $FUZZ_BUILD.log)"
  # Its own process group (setsid), so that a failing run stops all of it.
  KILN_FUZZ_OPT=${KILN_FUZZ_OPT:--O0} setsid bash -c \
    'TIMEFORMAT="[test] sanitizer build: %0R s wall, %0U s user + %0S s sys"
     time nice -n 19 tests/fuzz/build.sh "$1"' _ "$FUZZ_BUILD" \
    > "$FUZZ_BUILD.log" 2>&1 < /dev/null &
  sanitizer_pid=$!
  trap '[ -z "$sanitizer_pid" ] || kill -- -"$sanitizer_pid" 2>/dev/null; true' EXIT
fi

# --durations: the slowest tests, so that CI's log says where a run's time goes.
echo "[test] Python tests (pytest)"
timed "Python tests passed" "$KILN_PYTHON" -m pytest -q --durations=25 tests

if [ "$SANITIZE" != 0 ]; then
  echo "[test] waiting for the sanitizer build"
  if ! timed "waited for the sanitizer build" wait "$sanitizer_pid"; then
    sanitizer_pid=""
    tail -40 "$FUZZ_BUILD.log"
    echo "[test] sanitizer build FAILED (whole log: $FUZZ_BUILD.log)"
    exit 1
  fi
  sanitizer_pid=""
  tail -1 "$FUZZ_BUILD.log"
  echo "[test] sanitizer build's C++ tests (ctest)"
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    timed "sanitizer tests passed" ctest --test-dir "$FUZZ_BUILD" --output-on-failure -j2
  echo "[test] fuzz smoke (${KILN_FUZZ_SMOKE_SECONDS:-3} s per target)"
  timed "fuzz smoke" tests/fuzz/run.sh "$FUZZ_BUILD" "${KILN_FUZZ_SMOKE_SECONDS:-3}"
fi
echo "[test] all tests passed"
