#!/usr/bin/env bash
# Runs targets of a fuzz build as plain libFuzzer processes, N at once per target (not fork mode:
# for the tokenizer targets, whose inputs grow toward -max_len, fork mode's per-child restarts
# and merges cost more per core than they give; tests/fuzz/README.md), all at nice 19, so that a
# machine busy with other work lends it only idle cores.
#
#   tests/fuzz/many.sh BUILD SECONDS TARGET:N [TARGET:N...]
#
# Each process has its own random seed (libFuzzer's default) and log (BUILD/fuzz-logs/<target>.many-<i>.log) and
# adds what it finds to the target's one corpus, BUILD/fuzz-corpus/<target> (libFuzzer names an
# input by its SHA-1, so the processes never overwrite one another), seeded from
# tests/fuzz/corpus/<target>. BUILD is a fuzz build or a carried copy (tests/fuzz/pack.sh).
# Prints one line per target: executions summed over its processes (a process stopped early
# counts to its last status line), findings. Exit status 1 if any process found something.
# `tests/fuzz/many.sh BUILD --report TARGET...` prints the same lines from the logs of a run that
# is still going or was stopped.
set -euo pipefail
cd "$(dirname "$0")/../.."
usage="usage: many.sh BUILD SECONDS TARGET:N [TARGET:N...]  |  many.sh BUILD --report TARGET..."
BUILD=$(cd "${1:?$usage}" && pwd)
SECONDS_EACH=${2:?$usage}
shift 2
[ $# -gt 0 ] || { echo "$usage" >&2; exit 2; }
source tests/fuzz/env.sh

report() {  # target: one line from its logs
  local t=$1 execs=0 n=0 found=0 log e
  for log in "$BUILD/fuzz-logs/$t".many-*.log; do
    [ -f "$log" ] || continue
    n=$((n + 1))
    e=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    [ -n "$e" ] || e=$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#')
    execs=$((execs + ${e:-0}))
    if grep -qE '^==[0-9]+==ERROR|^SUMMARY: |runtime error|FUZZ_CHECK' "$log"; then
      found=$((found + 1))
    fi
  done
  if [ "$found" -eq 0 ]; then
    echo "[fuzz] $t: $execs execs over $n processes: no findings"
  else
    echo "[fuzz] $t: $execs execs over $n processes: $found FOUND A PROBLEM (logs $BUILD/fuzz-logs/$t.many-*.log)"
  fi
  [ "$found" -eq 0 ]
}

if [ "$SECONDS_EACH" = --report ]; then
  rc=0
  for t in "$@"; do report "$t" || rc=1; done
  exit $rc
fi

pids=()
for spec in "$@"; do
  t=${spec%%:*} n=${spec#*:}
  [[ "$spec" == *:* && "$n" =~ ^[0-9]+$ && "$n" -gt 0 ]] || { echo "$usage (got '$spec')" >&2; exit 2; }
  bin=$BUILD/fuzz/$t
  [ -x "$bin" ] || { echo "[fuzz] $t: not built ($bin)" >&2; exit 2; }
  mkdir -p "$BUILD/fuzz-corpus/$t"
  rm -f "$BUILD/fuzz-logs/$t".many-*.log
  for i in $(seq 1 "$n"); do
    # The options of run.sh.
    nice -n 19 "$bin" -max_total_time="$SECONDS_EACH" -timeout=20 -rss_limit_mb=2048 \
      -max_len=16384 -print_final_stats=1 -artifact_prefix="$BUILD/fuzz-artifacts/$t-" \
      "$BUILD/fuzz-corpus/$t" "tests/fuzz/corpus/$t" >"$BUILD/fuzz-logs/$t.many-$i.log" 2>&1 &
    pids+=($!)
  done
done
for p in "${pids[@]}"; do wait "$p" || true; done
rc=0
for spec in "$@"; do report "${spec%%:*}" || rc=1; done
exit $rc
