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

echo "[test] C++ tests (ctest)"
ctest --test-dir "$BUILD" --output-on-failure -j2

echo "[test] Python tests (pytest)"
"$KILN_PYTHON" -m pytest -q tests
echo "[test] all tests passed"
