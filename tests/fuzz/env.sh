# Sourced by run.sh and parallel.sh (tests/fuzz/README.md): the default target list, the
# tokenizer data of tokenizer_encode_fuzz, a scratch TMPDIR and the sanitizer options, for the
# fuzz build (or carried copy of its binaries) at $BUILD.
KILN_FUZZ_ALL_TARGETS=(wire_decode_fuzz coordinator_fuzz node_session_fuzz safetensors_fuzz
                       json_readers_fuzz clip_tokenizer_fuzz t5_tokenizer_fuzz
                       tokenizer_encode_fuzz png_fuzz)
export KILN_FUZZ_DATA=$BUILD/fuzz-data
# The flux-tiny tokenizers, written once by kiln.tokenizer_files (a carried copy brings its own,
# tests/fuzz/pack.sh, so the host needs no Python).
if [ ! -f "$KILN_FUZZ_DATA/tokenizer_2/spiece.model" ]; then
  PY=${KILN_PYTHON:-$PWD/.venv/bin/python}
  rm -rf "$KILN_FUZZ_DATA"
  PYTHONPATH=$PWD/pipeline/python "$PY" -c "import sys; from kiln import tokenizer_files as t; \
t.write_clip_tokenizer(sys.argv[1] + '/tokenizer'); t.write_t5_tokenizer(sys.argv[1] + '/tokenizer_2')" \
    "$KILN_FUZZ_DATA" >/dev/null
fi
# A carried copy (pack.sh) brings its grown corpora as one archive.
if [ -f "$BUILD/fuzz-corpus.tgz" ] && [ ! -d "$BUILD/fuzz-corpus" ]; then
  tar xzf "$BUILD/fuzz-corpus.tgz" -C "$BUILD"
fi
export TMPDIR=$BUILD/fuzz-tmp
mkdir -p "$TMPDIR" "$BUILD/fuzz-artifacts" "$BUILD/fuzz-logs"
# ASan: leaks are findings too; UBSan stops at the first report (built -fno-sanitize-recover).
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:symbolize=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
