#!/usr/bin/env bash
# Copies what tests/fuzz/parallel.sh or many.sh needs from a fuzz build into OUT, small enough to carry to
# another host: the targets with their debug info stripped (strip -g: symbols stay, so ASan's
# reports still name functions), the tokenizer data of tokenizer_encode_fuzz, and the grown
# corpora of the targets packed (fuzz-corpus.tgz). Then, from the repository root on that host:
#   LD_LIBRARY_PATH=<Debian libraries> tests/fuzz/parallel.sh OUT SECONDS
#
#   tests/fuzz/pack.sh BUILD OUT [TARGET...]     (default: every target)
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD=$(cd "${1:?usage: pack.sh BUILD OUT}" && pwd)
OUT=${2:?usage: pack.sh BUILD OUT [TARGET...]}
shift 2
source tests/fuzz/env.sh  # writes BUILD/fuzz-data if missing
mkdir -p "$OUT/fuzz"
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=("${KILN_FUZZ_ALL_TARGETS[@]}")
for t in "${TARGETS[@]}"; do
  strip -g -o "$OUT/fuzz/$t" "$BUILD/fuzz/$t"
done
rm -rf "$OUT/fuzz-data" && cp -r "$BUILD/fuzz-data" "$OUT/fuzz-data"
# The corpora as one archive: thousands of small files (42 MB on disk after a 20-minute run) are
# under 1 MB compressed; parallel.sh unpacks it where it finds no fuzz-corpus folder.
rm -rf "$OUT/fuzz-corpus" "$OUT/fuzz-corpus.tgz"
if [ -d "$BUILD/fuzz-corpus" ]; then
  tar czf "$OUT/fuzz-corpus.tgz" -C "$BUILD" "${TARGETS[@]/#/fuzz-corpus/}"
fi
du -sh --total "$OUT"/*
