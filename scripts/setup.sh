#!/usr/bin/env bash
# Installs what kiln needs to build and test, idempotently: Debian packages (apt) and a project
# virtualenv (.venv) with the pinned Python packages. Safe to run again; does nothing when all is
# present. Called by `make`.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  build-essential cmake ninja-build pkg-config
  libabsl-dev libprotobuf-dev protobuf-compiler
  libpng-dev libgtest-dev libgmock-dev nlohmann-json3-dev libsodium-dev
  libzmq3-dev cppzmq-dev prometheus-cpp-dev libhiredis-dev redis-server
  libgloo-dev  # gloo's headers, for parallel/'s CPU process groups (LibTorch carries gloo itself)
  prometheus chromium
  iproute2
  clang libclang-rt-14-dev  # the sanitizer + libFuzzer build (tests/fuzz)
  python3-venv
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "[setup] Debian packages: all present"
fi

PY=${KILN_BOOTSTRAP_PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating virtualenv .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.kiln-requirements
# KILN_TORCH_INDEX: the pip index torch comes from (unset: pip's default, which here gives the CPU
# build). A CUDA build for GPU nodes: KILN_TORCH_INDEX=https://download.pytorch.org/whl/cu130.
# The index is part of the stamp, so changing it reinstalls torch.
want=$(cat requirements.txt; echo "# torch index: ${KILN_TORCH_INDEX:-default}")
if [ ! -f "$stamp" ] || [ "$want" != "$(cat "$stamp")" ]; then
  echo "[setup] installing Python packages from requirements.txt (torch 2.13.0 from ${KILN_TORCH_INDEX:-the default index})"
  # (pip's notes about unreachable extra index locations are noise here and filtered out)
  .venv/bin/pip install -q --disable-pip-version-check ${KILN_TORCH_INDEX:+--force-reinstall --index-url "$KILN_TORCH_INDEX"} \
    torch==2.13.0 2> >(grep -v "is ignored" >&2)
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt 2> >(grep -v "is ignored" >&2)
  echo "$want" > "$stamp"
else
  echo "[setup] Python packages: all present"
fi
