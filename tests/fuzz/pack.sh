#!/usr/bin/env bash
# Copies what tests/fuzz/parallel.sh needs from a fuzz build into OUT, small enough to carry to
# another host: the targets with their debug info stripped (strip -g: symbols stay, so ASan's
# reports still name functions), the tokenizer data of tokenizer_encode_fuzz, and the grown
# corpora. Then, from the repository root on that host:
#   LD_LIBRARY_PATH=<Debian libraries> tests/fuzz/parallel.sh OUT SECONDS
#
#   tests/fuzz/pack.sh BUILD OUT
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD=$(cd "${1:?usage: pack.sh BUILD OUT}" && pwd)
OUT=${2:?usage: pack.sh BUILD OUT}
source tests/fuzz/env.sh  # writes BUILD/fuzz-data if missing
mkdir -p "$OUT/fuzz"
for t in "${KILN_FUZZ_ALL_TARGETS[@]}"; do
  strip -g -o "$OUT/fuzz/$t" "$BUILD/fuzz/$t"
done
rm -rf "$OUT/fuzz-data" && cp -r "$BUILD/fuzz-data" "$OUT/fuzz-data"
if [ -d "$BUILD/fuzz-corpus" ]; then
  rm -rf "$OUT/fuzz-corpus" && cp -r "$BUILD/fuzz-corpus" "$OUT/fuzz-corpus"
fi
du -sh "$OUT"/* "$OUT"
