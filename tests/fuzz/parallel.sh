#!/usr/bin/env bash
# Runs the libFuzzer targets of a fuzz build over every core of the machine for SECONDS in all:
# the targets one after another, each with libFuzzer's fork mode (-fork=NPROC: NPROC child
# processes at a time, new inputs merged into one shared corpus), for a share of SECONDS in
# proportion to its weight. Crashes, timeouts and OOMs do not stop a run (-ignore_crashes etc.);
# each is saved as BUILD/fuzz-artifacts/<target>-crash-... and counted.
#
#   tests/fuzz/parallel.sh BUILD SECONDS [TARGET[:WEIGHT]...]
#
# BUILD is a fuzz build (tests/fuzz/build.sh) or a carried copy of its binaries
# (tests/fuzz/pack.sh). Default targets and weights: every target, the slow ones (per input)
# weighted up: coordinator_fuzz:3 clip_tokenizer_fuzz:2 t5_tokenizer_fuzz:2, the rest 1.
# Corpora: BUILD/fuzz-corpus/<target> (grown, shared with run.sh), seeded from
# tests/fuzz/corpus/<target>. Writes BUILD/fuzz-parallel/summary.txt and summary.json (per
# target: seconds, workers, executions, cov, ft, corpus entries, ooms/timeouts/crashes, the
# artifacts); exit status 1 if any target found something.
set -euo pipefail
cd "$(dirname "$0")/../.."
usage="usage: parallel.sh BUILD SECONDS [TARGET[:WEIGHT]...]"
BUILD=$(cd "${1:?$usage}" && pwd)
TOTAL=${2:?$usage}
shift 2
source tests/fuzz/env.sh
SPECS=("$@")
if [ ${#SPECS[@]} -eq 0 ]; then
  for t in "${KILN_FUZZ_ALL_TARGETS[@]}"; do
    case $t in
      coordinator_fuzz) SPECS+=("$t:3") ;;
      clip_tokenizer_fuzz | t5_tokenizer_fuzz) SPECS+=("$t:2") ;;
      *) SPECS+=("$t:1") ;;
    esac
  done
fi
WORKERS=${KILN_FUZZ_WORKERS:-$(nproc)}
weight() { if [[ $1 == *:* ]]; then echo "${1#*:}"; else echo 1; fi; }
sum=0
for s in "${SPECS[@]}"; do sum=$((sum + $(weight "$s"))); done
OUT=$BUILD/fuzz-parallel
mkdir -p "$OUT"
: >"$OUT/summary.tsv"
failed=0
for s in "${SPECS[@]}"; do
  t=${s%%:*}
  w=$(weight "$s")
  secs=$((TOTAL * w / sum))
  [ "$secs" -ge 1 ] || secs=1
  bin=$BUILD/fuzz/$t
  [ -x "$bin" ] || { echo "[fuzz] $t: not built ($bin)"; failed=1; continue; }
  work=$BUILD/fuzz-corpus/$t
  mkdir -p "$work"
  log=$BUILD/fuzz-logs/$t.parallel.log
  before=$(date +%s)
  rc=0
  "$bin" -fork="$WORKERS" -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1 \
    -max_total_time="$secs" -timeout=20 -rss_limit_mb=2048 -max_len=16384 \
    -artifact_prefix="$BUILD/fuzz-artifacts/$t-" "$work" "tests/fuzz/corpus/$t" >"$log" 2>&1 || rc=$?
  took=$(($(date +%s) - before))
  # Fork mode's status line: "#EXECS: cov: C ft: F corp: N exec/s E oom/timeout/crash: O/T/X ..."
  last=$(grep -E '^#[0-9]+: cov:' "$log" | tail -1 || true)
  execs=$(sed -n 's/^#\([0-9]*\):.*/\1/p' <<<"$last")
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  corp=$(sed -n 's/.* corp: \([0-9]*\).*/\1/p' <<<"$last")
  otc=$(sed -n 's/.* oom\/timeout\/crash: \([0-9]*\/[0-9]*\/[0-9]*\).*/\1/p' <<<"$last")
  otc=${otc:-0/0/0}
  artifacts=$(ls "$BUILD/fuzz-artifacts/$t-"* 2>/dev/null | tr '\n' ' ' || true)
  if [ "$rc" -ne 0 ] || [ "$otc" != "0/0/0" ]; then failed=1; fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "$took" "$WORKERS" "${execs:-0}" \
    "${cov:-0}" "${ft:-0}" "${corp:-0}" "$otc" "$rc" "$artifacts" >>"$OUT/summary.tsv"
  echo "[fuzz] $t: ${execs:-?} execs in ${took} s on $WORKERS workers, cov ${cov:-?}, ft ${ft:-?}," \
    "corpus ${corp:-?}, oom/timeout/crash $otc (exit $rc)"
done
# The summary, as text and JSON, from the rows above (awk: the host may have no Python).
awk -F'\t' -v cores="$(nproc)" -v total="$TOTAL" -v txt="$OUT/summary.txt" -v json="$OUT/summary.json" '
  BEGIN {
    printf "%d cores, %d s asked\n", cores, total > txt
    printf "%-22s %6s %4s %12s %6s %7s %7s %s\n", "target", "s", "jobs", "executions", "cov", "ft",
           "corpus", "oom/timeout/crash" > txt
    printf "{\"cores\": %d, \"seconds\": %d, \"targets\": [", cores, total > json
  }
  {
    split($8, otc, "/")
    n = split($10, arts, " ")
    printf "%-22s %6d %4d %12d %6d %7d %7d %s%s%s\n", $1, $2, $3, $4, $5, $6, $7, $8,
           (n ? "  " : ""), $10 > txt
    list = ""
    for (i = 1; i <= n; i++) list = list (i > 1 ? ", " : "") "\"" arts[i] "\""
    printf "%s\n {\"target\": \"%s\", \"seconds\": %d, \"workers\": %d, \"executions\": %d, " \
           "\"cov\": %d, \"ft\": %d, \"corpus\": %d, \"ooms\": %d, \"timeouts\": %d, " \
           "\"crashes\": %d, \"exit\": %d, \"artifacts\": [%s]}", (NR > 1 ? "," : ""), $1, $2, $3,
           $4, $5, $6, $7, otc[1], otc[2], otc[3], $9, list > json
  }
  END { printf "\n]}\n" > json }
' "$OUT/summary.tsv"
cat "$OUT/summary.txt"
exit $failed
