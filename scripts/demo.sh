#!/usr/bin/env bash
# `make demo`: writes the seeded flux-tiny model, then generates an image from a prompt with
# kiln-run twice: the first run compiles each component's package into the local package
# directory, the second finds them all and compiles nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=$(cd "${1:-build}" && pwd)
STATE=${KILN_DEMO_DIR:-$PWD/.kiln}
MODEL=$STATE/models/flux-tiny
PACKAGES=$STATE/packages
PROMPT=${PROMPT:-"a red fox in fresh snow, watercolor"}
export PYTHONPATH=$PWD/pipeline/python${PYTHONPATH:+:$PYTHONPATH}

if [ ! -f "$MODEL/model_index.json" ]; then
  echo "[demo] writing the seeded flux-tiny model to $MODEL"
  .venv/bin/python -m kiln.make_tiny "$MODEL" --seed 0
fi
mkdir -p out
for run in 1 2; do
  echo "[demo] run $run: kiln-run --prompt \"$PROMPT\" (256x256, 8 steps, seed 42)"
  "$BUILD/bin/kiln-run" --model "$MODEL" --package_dir "$PACKAGES" --prompt "$PROMPT" \
    --width 256 --height 256 --steps 8 --seed 42 --out "out/demo-$run.png" --json > "out/demo-$run.json"
  .venv/bin/python - "out/demo-$run.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
s = r["seconds"]
print(f"[demo]   image: {r['image']}  packages: " + ", ".join(f"{k}={v}" for k, v in sorted(r["packages"].items())))
print("[demo]   seconds: " + "  ".join(f"{k} {s[k]:.2f}" for k in ("compile", "package_load", "weights", "text_encoding", "denoise", "decode", "total")))
for w in r["warnings"]:
    print(f"[demo]   warning: {w}")
PY
done
if cmp -s out/demo-1.png out/demo-2.png; then
  echo "[demo] both runs wrote byte-identical PNGs (same seed): $PWD/out/demo-2.png"
else
  echo "[demo] ERROR: the two runs differ" >&2; exit 1
fi
