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
# LibTorch's OpenMP threads sleep at the end of a parallel region instead of spinning. By default
# they spin, and two LibTorch processes on two cores (a kiln-node beside a kiln-run, four
# kiln-compile canaries at once, ctest -j2, pytest's two workers) then take turns to burn each
# other's time slices: kiln-run, 1000 flux-tiny steps, took 8.8 s alone, 91 s beside two CPU-bound
# processes and 46 s two at once; passive 10.9 s, 16 s and 17 s, byte-identical images. (This is
# why the three-host test's reference kiln-run once did not finish in 300 s beside a build.)
# Measured on this 2-core machine: ctest 155 -> 110 s, the fixture packages 57 -> 51 s.
export OMP_WAIT_POLICY=PASSIVE

# timed LABEL COMMAND...: runs it and prints its wall time and its processes' CPU time, so that
# CI's log says where a run's time goes (a step's user + sys over its wall is how many cores it
# kept busy).
timed() {
  local TIMEFORMAT="[test] $1: %0R s wall, %0U s user + %0S s sys"
  shift
  time "$@"
}

# The sanitizer build (the LibTorch-free libraries, their tests and the libFuzzer targets again with
# clang + ASan + UBSan, at -O0: half of -O2's compile time or less under ASan, tests/fuzz/build.sh)
# needs nothing from the steps below, so it compiles beside them at nice 19, in its own process
# group (setsid: a failing run stops all of it), on the CPU they leave idle: pytest's workers
# mostly wait on processes, sockets and timers; the tests' own processes, at nice 0, take a core
# from it at once. setsid also makes a new scheduler autogroup (Linux with autogroup on, as here)
# and nice counts only inside an autogroup, so the group itself gets nice 19: without that the
# "nice 19" build took an equal share from pytest (a try beside pytest was at 67% of the tests
# after 11.5 min; alone they took 8.1). Its tests and a few seconds of every libFuzzer target run
# last (tests/fuzz/README.md). KILN_TEST_SANITIZE=0 skips all of it. (A build beside pytest once
# made the three-host test's reference kiln-run miss its 300 s: the autogroup and OpenMP spinning,
# see above.)
SANITIZE=${KILN_TEST_SANITIZE:-1}
FUZZ_BUILD=$BUILD-fuzz
sanitizer_pid=""
if [ "$SANITIZE" != 0 ]; then
  echo "[test] sanitizer build (ASan + UBSan, no LibTorch) in $FUZZ_BUILD, at nice 19 beside the"
  echo "[test]   steps below (its log: $FUZZ_BUILD/build.log)"
  mkdir -p "$FUZZ_BUILD"
  KILN_FUZZ_OPT=${KILN_FUZZ_OPT:--O0} setsid bash -c \
    'echo 19 > /proc/self/autogroup 2>/dev/null || true
     TIMEFORMAT="[test] sanitizer build: %0R s wall, %0U s user + %0S s sys"
     time nice -n 19 tests/fuzz/build.sh "$1"' _ "$FUZZ_BUILD" \
    > "$FUZZ_BUILD/build.log" 2>&1 < /dev/null &
  sanitizer_pid=$!
  trap '[ -z "$sanitizer_pid" ] || kill -- -"$sanitizer_pid" 2>/dev/null; true' EXIT
fi

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

# Two more fixtures from copies of those packages (tests count the ones in packages/), made at
# once (the regional one compiles on one core: 79 s wall, 73 s user; one after the other they
# took 126 s, at once 91 s, in two fresh-clone runs an hour apart on this 2-core machine):
# - the same image with the regional transformer layout (only the transformer compiles);
# - a batch of 2, where the batch-2 transformer and VAE decoder compile: two jobs (seeds 7 and 8)
#   denoised as one batch (FluxPipeline::DenoiseDecodeBatch); the batch tests use these packages.
regional_fixture() {
  rm -rf "$KILN_TESTDATA/packages-regional"
  cp -r "$KILN_TESTDATA/packages" "$KILN_TESTDATA/packages-regional"
  "$KILN_BIN/kiln-run" --model "$KILN_TESTDATA/flux-tiny" \
    --package_dir "$KILN_TESTDATA/packages-regional" \
    --prompt "a lighthouse on a cliff at dusk" --width 256 --height 256 --steps 4 --seed 7 \
    --compile_options '{"layout":"regional"}' \
    --out "$KILN_TESTDATA/first-regional.png" --json > "$KILN_TESTDATA/first-regional.json"
}
batch_fixture() {
  rm -rf "$KILN_TESTDATA/packages-batch"
  cp -r "$KILN_TESTDATA/packages" "$KILN_TESTDATA/packages-batch"
  "$KILN_BIN/kiln-run" --model "$KILN_TESTDATA/flux-tiny" \
    --package_dir "$KILN_TESTDATA/packages-batch" \
    --prompt "a lighthouse on a cliff at dusk" --width 256 --height 256 --steps 4 --seed 7 \
    --batch 2 --out "$KILN_TESTDATA/batch.png" --json > "$KILN_TESTDATA/batch.json"
}
both_fixtures() {
  local regional batch
  regional_fixture & regional=$!
  batch_fixture & batch=$!
  wait "$regional" || { echo "[test] regional fixture failed" >&2; return 1; }
  wait "$batch" || { echo "[test] batch fixture failed" >&2; return 1; }
}
echo "[test] fixtures: the regional layout into $KILN_TESTDATA/packages-regional, a batch of 2"
echo "[test]   into $KILN_TESTDATA/packages-batch"
timed "regional and batch fixtures" both_fixtures
echo "[test] regional fixture: $(cat "$KILN_TESTDATA/first-regional.json")"

echo "[test] C++ tests (ctest)"
timed "C++ tests passed" ctest --test-dir "$BUILD" --output-on-failure -j2

# --durations: the slowest tests, so that CI's log says where a run's time goes. Two workers
# (pytest-xdist): many cluster tests wait on heartbeats and processes, and one worker kept less
# than one core busy. The tests that compile the fixtures' keys, and the three-host tests, are
# xdist_group "compiles": one worker runs them one at a time (tests/cluster/test_cluster_cache.py
# says why).
echo "[test] Python tests (pytest, 2 workers)"
timed "Python tests passed" "$KILN_PYTHON" -m pytest -q --durations=25 -n 2 --dist loadgroup \
  tests

if [ "$SANITIZE" != 0 ]; then
  echo "[test] waiting for the sanitizer build"
  if ! timed "waited for the sanitizer build" wait "$sanitizer_pid"; then
    sanitizer_pid=""
    tail -40 "$FUZZ_BUILD/build.log"
    echo "[test] sanitizer build FAILED (whole log: $FUZZ_BUILD/build.log)"
    exit 1
  fi
  sanitizer_pid=""
  tail -1 "$FUZZ_BUILD/build.log"
  echo "[test] sanitizer build's C++ tests (ctest)"
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    timed "sanitizer tests passed" ctest --test-dir "$FUZZ_BUILD" --output-on-failure -j2
  echo "[test] fuzz smoke (${KILN_FUZZ_SMOKE_SECONDS:-3} s per target)"
  timed "fuzz smoke" tests/fuzz/run.sh "$FUZZ_BUILD" "${KILN_FUZZ_SMOKE_SECONDS:-3}"
fi
echo "[test] all tests passed"
