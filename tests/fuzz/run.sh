#!/usr/bin/env bash
# Runs the libFuzzer targets of a fuzz build (tests/fuzz/README.md) for SECONDS each, one after
# the other, and prints one line per target: executions, coverage (cov, ft), corpus size, and
# whether it found anything. Exit status 1 if any target crashed, leaked, timed out or ran out
# of memory (the input is saved as BUILD/fuzz-artifacts/<target>-crash-...).
#
#   tests/fuzz/run.sh BUILD SECONDS [TARGET...]     (default: every target)
#
# Each target grows a working corpus in BUILD/fuzz-corpus/<target>, seeded from the committed
# tests/fuzz/corpus/<target> (read only). The tokenizer encoder target reads the flux-tiny
# tokenizers, written once into BUILD/fuzz-data by kiln.tokenizer_files.
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD=$(cd "${1:?usage: run.sh BUILD SECONDS [TARGET...]}" && pwd)
SECONDS_EACH=${2:?usage: run.sh BUILD SECONDS [TARGET...]}
shift 2
source tests/fuzz/env.sh
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=("${KILN_FUZZ_ALL_TARGETS[@]}")

failed=0
for t in "${TARGETS[@]}"; do
  bin=$BUILD/fuzz/$t
  [ -x "$bin" ] || { echo "[fuzz] $t: not built ($bin)"; failed=1; continue; }
  work=$BUILD/fuzz-corpus/$t
  mkdir -p "$work"
  log=$BUILD/fuzz-logs/$t.log
  rc=0
  # The tokenizer loaders' seeds are a few KB; -max_len leaves room to grow them.
  "$bin" -max_total_time="$SECONDS_EACH" -timeout=20 -rss_limit_mb=2048 -max_len=16384 \
    -print_final_stats=1 -artifact_prefix="$BUILD/fuzz-artifacts/$t-" \
    "$work" "tests/fuzz/corpus/$t" >"$log" 2>&1 || rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  last=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  corp=$(sed -n 's/.* corp: \([0-9]*\/[0-9]*[a-zA-Z]*\).*/\1/p' <<<"$last")
  if [ "$rc" -eq 0 ]; then
    echo "[fuzz] $t: ${execs:-?} execs in ${SECONDS_EACH} s, cov ${cov:-?}, ft ${ft:-?}, corpus ${corp:-?}: no findings"
  else
    failed=1
    echo "[fuzz] $t: FOUND A PROBLEM (exit $rc) after ${execs:-?} execs; log $log; input:"
    ls -t "$BUILD/fuzz-artifacts/$t-"* 2>/dev/null | head -1 | sed 's/^/[fuzz]   /'
    grep -E 'ERROR: |FUZZ_CHECK|runtime error|SUMMARY' "$log" | head -5 | sed 's/^/[fuzz]   /'
  fi
done
exit $failed
