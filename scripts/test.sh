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

echo "[test] fixture: seeded flux-tiny repository in $KILN_TESTDATA/flux-tiny"
rm -rf "$KILN_TESTDATA/flux-tiny"
"$KILN_PYTHON" -m kiln.make_tiny "$KILN_TESTDATA/flux-tiny" --seed 0

echo "[test] fixture: compiling flux-tiny packages (256x256, fp32, cpu) into $KILN_TESTDATA/packages"
rm -rf "$KILN_TESTDATA/packages"
start=$(date +%s)
"$KILN_BIN/kiln-run" --model "$KILN_TESTDATA/flux-tiny" --package_dir "$KILN_TESTDATA/packages" \
  --prompt "a lighthouse on a cliff at dusk" --width 256 --height 256 --steps 4 --seed 7 \
  --out "$KILN_TESTDATA/first.png" --json > "$KILN_TESTDATA/first.json"
echo "[test] fixture ready in $(( $(date +%s) - start )) s: $(cat "$KILN_TESTDATA/first.json")"

# A copy of the packages (tests count the ones in packages/), where only the transformer compiles.
echo "[test] fixture: the same image with the regional transformer layout into $KILN_TESTDATA/packages-regional"
rm -rf "$KILN_TESTDATA/packages-regional"
cp -r "$KILN_TESTDATA/packages" "$KILN_TESTDATA/packages-regional"
start=$(date +%s)
"$KILN_BIN/kiln-run" --model "$KILN_TESTDATA/flux-tiny" --package_dir "$KILN_TESTDATA/packages-regional" \
  --prompt "a lighthouse on a cliff at dusk" --width 256 --height 256 --steps 4 --seed 7 \
  --compile_options '{"layout":"regional"}' \
  --out "$KILN_TESTDATA/first-regional.png" --json > "$KILN_TESTDATA/first-regional.json"
echo "[test] regional fixture ready in $(( $(date +%s) - start )) s: $(cat "$KILN_TESTDATA/first-regional.json")"

# Another copy, where the batch-2 transformer and VAE decoder compile: two jobs (seeds 7 and 8)
# denoised as one batch (FluxPipeline::DenoiseDecodeBatch); the batch tests use these packages.
echo "[test] fixture: a batch of 2 (batch-2 transformer and VAE) into $KILN_TESTDATA/packages-batch"
rm -rf "$KILN_TESTDATA/packages-batch"
cp -r "$KILN_TESTDATA/packages" "$KILN_TESTDATA/packages-batch"
start=$(date +%s)
"$KILN_BIN/kiln-run" --model "$KILN_TESTDATA/flux-tiny" --package_dir "$KILN_TESTDATA/packages-batch" \
  --prompt "a lighthouse on a cliff at dusk" --width 256 --height 256 --steps 4 --seed 7 --batch 2 \
  --out "$KILN_TESTDATA/batch.png" --json > "$KILN_TESTDATA/batch.json"
echo "[test] batch fixture ready in $(( $(date +%s) - start )) s"

echo "[test] C++ tests (ctest)"
start=$(date +%s)
ctest --test-dir "$BUILD" --output-on-failure -j2
echo "[test] C++ tests passed in $(( $(date +%s) - start )) s"

# --durations: the slowest tests, so that CI's log says where a run's time goes.
echo "[test] Python tests (pytest)"
start=$(date +%s)
"$KILN_PYTHON" -m pytest -q --durations=25 tests
echo "[test] Python tests passed in $(( $(date +%s) - start )) s"

# The LibTorch-free libraries' tests again, built with clang + ASan + UBSan, and every libFuzzer
# target for a few seconds on its corpus (tests/fuzz/README.md). KILN_TEST_SANITIZE=0 skips it.
if [ "${KILN_TEST_SANITIZE:-1}" != 0 ]; then
  FUZZ_BUILD=$BUILD-fuzz
  echo "[test] sanitizer build (ASan + UBSan, no LibTorch) in $FUZZ_BUILD"
  start=$(date +%s)
  # -O0: a third of -O2's compile time under ASan (tests/fuzz/build.sh).
  KILN_FUZZ_OPT=${KILN_FUZZ_OPT:--O0} tests/fuzz/build.sh "$FUZZ_BUILD"
  echo "[test] sanitizer build ready in $(( $(date +%s) - start )) s; its C++ tests (ctest)"
  start=$(date +%s)
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    ctest --test-dir "$FUZZ_BUILD" --output-on-failure -j2
  echo "[test] sanitizer tests passed in $(( $(date +%s) - start )) s; fuzz smoke (${KILN_FUZZ_SMOKE_SECONDS:-3} s per target)"
  tests/fuzz/run.sh "$FUZZ_BUILD" "${KILN_FUZZ_SMOKE_SECONDS:-3}"
fi
echo "[test] all tests passed"
