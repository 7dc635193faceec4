#!/usr/bin/env bash
# Exploration on the GPU host (Python only, no kiln build): attention kernels, and regional
# torch.compile of the flux-dev transformer with each attention kernel and fused/unfused QKV,
# bf16 and fp8, with a per-kernel-class profile. Used to choose kiln's default compile options;
# the figures that count come from run.sh. Usage: bench/gpu/explore.sh OUTDIR
set -uo pipefail
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD/pipeline/python PYTHONUNBUFFERED=1
W=${KILN_GPU_WORK:-/tmp/kiln-gpu}/flux-dev
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
[ -f "$W/transformer/diffusion_pytorch_model.safetensors" ] || \
  python3 -m kiln.make_synthetic "$W" --components transformer > "$OUT/weights.json"
B="python3 bench/gpu/baselines.py --model $W --iters 8"
$B --out "$OUT/sdpa" --attention-bench --attention sdpa --profile 2>&1 | tee "$OUT/sdpa.log" | grep -v Warning
$B --out "$OUT/cudnn-fused" --attention cudnn --fuse-qkv --modes compile --profile 2>&1 | tee "$OUT/cudnn-fused.log" | grep -v Warning
$B --out "$OUT/cudnn" --attention cudnn --modes compile 2>&1 | tee "$OUT/cudnn.log" | grep -v Warning
