#!/usr/bin/env bash
# `make image`: builds kiln's coordinator and node images with podman from
# deploy/container/Containerfile, then checks the node image by running its executables inside
# its root filesystem. Not part of `make test` (a full build in the image takes a long while).
#
#   deploy/container/build.sh [--variant cpu|cuda] [--tag TAG] [--no-check]
#
# No image registry is reachable on kiln's development machines, so the base image is made here
# (base.sh: debootstrap + podman import) and the build runs with `--isolation chroot`. `podman
# run` does not work on these machines (cgroups), so the check mounts the image (`podman mount`)
# and runs in it with chroot, as user kiln: `kiln --version` (or `kiln --help` while --version
# does not exist), `kiln-coordinator --helpfull`, `kiln-node --helpfull`, and `kiln-run` on a
# seeded flux-tiny model, which compiles every package with the image's own PyTorch and C++
# compiler and writes a PNG (compared with `make test`'s fixture when there is one).
# The default variant is cpu (what this machine can run); pip inside the build uses this
# machine's pip configuration (`pip config list`; the local files and wheel directories it names
# are mounted read-only), which is where torch==VERSION+cpu comes from here.
set -euo pipefail
cd "$(dirname "$0")/../.."

variant=cpu tag="" check=1
while [ $# -gt 0 ]; do
  case "$1" in
    --variant) variant=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --no-check) check=0; shift ;;
    *) echo "usage: $0 [--variant cpu|cuda] [--tag TAG] [--no-check]" >&2; exit 2 ;;
  esac
done
case "$variant" in cpu|cuda) ;; *) echo "--variant must be cpu or cuda" >&2; exit 2 ;; esac
tag=${tag:-$variant}

# podman, buildah and debootstrap come from Debian, for this command only (not in setup.sh).
missing=()
for p in podman buildah debootstrap fuse-overlayfs uidmap; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[image] installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

deploy/container/base.sh
base=${KILN_BASE_IMAGE:-localhost/kiln-base:bookworm}

# This machine's pip configuration (`pip config list`: its files and PIP_* variables), so that the
# build finds the same wheels as setup.sh does: written to a pip.conf mounted at /etc/pip.conf,
# with every local file or directory it names (CA bundle, wheel directories, file:// indexes,
# constraints) mounted read-only under /mnt/host. Mounts are not stored in the image's layers.
pip_conf=$(mktemp /var/tmp/kiln-image-pip.XXXXXX.conf)
trap 'rm -f "$pip_conf"' EXIT
volumes=(--volume "$pip_conf:/etc/pip.conf:ro")
if [ -x .venv/bin/pip ]; then
  for path in $(.venv/bin/python - "$pip_conf" "$variant" <<'PY'
import os, re, subprocess, sys
out = subprocess.run([".venv/bin/pip", "config", "list"], capture_output=True, text=True).stdout
conf, paths = {}, set()
for line in out.splitlines():
    m = re.match(r"^(?:global|:env:)\.([a-z-]+)='(.*)'$", line)
    # For the CUDA variant, local wheel sources are left out: they hold torch's +cpu build,
    # which pip would prefer to PyPI's CUDA build of the same version.
    if m and not (sys.argv[2] == "cuda" and m[1] in ("find-links", "extra-index-url")):
        conf.setdefault(m[1], m[2])
def inside(token):
    prefix = "file://" if token.startswith("file://") else ""
    path = token[len(prefix):]
    if path.startswith("/") and os.path.exists(path):
        # A file:// index (DIR/simple) may link its files as ../../files/...: mount DIR.
        paths.add(os.path.dirname(path.rstrip("/")) if prefix else path)
        return prefix + "/mnt/host" + path
    return token
with open(sys.argv[1], "w") as f:
    f.write("[global]\n")
    for key, value in conf.items():
        f.write(f"{key} = {' '.join(inside(t) for t in value.split())}\n")
print("\n".join(sorted(paths)))
PY
  ); do
    volumes+=(--volume "$path:/mnt/host$path:ro")
  done
fi
ccache_dir=${KILN_IMAGE_CCACHE:-/var/cache/kiln-image/ccache}
mkdir -p "$ccache_dir"
volumes+=(--volume "$ccache_dir:/ccache")

build_target() {  # TARGET IMAGE
  local start=$(date +%s)
  echo "[image] building $2 (target $1, torch $variant)"
  nice -n 10 podman build --isolation chroot -f deploy/container/Containerfile \
    --ignorefile deploy/container/containerignore \
    --build-arg BASE="$base" --build-arg TORCH_VARIANT="$variant" \
    --build-arg JOBS="${KILN_IMAGE_JOBS:-2}" "${volumes[@]}" \
    --target "$1" -t "$2" . >"${log_dir}/$1.log" 2>&1 ||
    { tail -40 "${log_dir}/$1.log"; echo "[image] build of $2 failed (log: ${log_dir}/$1.log)"; exit 1; }
  echo "[image] built $2 in $(( $(date +%s) - start )) s; size $(podman image inspect --format '{{.Size}}' "$2" | numfmt --to=iec)"
}
log_dir=$(mktemp -d /var/tmp/kiln-image-logs.XXXXXX)
build_target node "localhost/kiln-node:$tag"
build_target coordinator "localhost/kiln-coordinator:$tag"
[ "$check" -eq 1 ] || exit 0

# The check: the executables run in the node image's root filesystem.
echo "[image] checking localhost/kiln-node:$tag in its root filesystem (podman mount + chroot)"
py=${KILN_PYTHON:-.venv/bin/python}
ctr=$(podman create "localhost/kiln-node:$tag")
mnt=$(podman mount "$ctr")
cleanup() {
  rm -f "$pip_conf"
  umount "$mnt/proc" 2>/dev/null || true
  umount -R "$mnt/dev" 2>/dev/null || true
  podman umount "$ctr" >/dev/null 2>&1 || true
  podman rm -f "$ctr" >/dev/null 2>&1 || true
}
trap cleanup EXIT
mount -t proc proc "$mnt/proc"
# /dev with its submounts (/dev/shm: the compile workers' semaphores), not propagating back.
mount --rbind /dev "$mnt/dev"
mount --make-rslave "$mnt/dev"
in_image() { chroot --userspec=10001:10001 "$mnt" env HOME=/var/lib/kiln PATH=/usr/local/bin:/usr/bin:/bin "$@"; }
if in_image kiln --version >/dev/null 2>&1; then in_image kiln --version; else
  echo "[image] (kiln has no --version yet) kiln --help:"; in_image kiln --help | head -3; fi
# (absl's --helpfull exits 1; what counts is that the binaries load and list their flags)
for exe in kiln-coordinator kiln-node; do
  help=$(in_image "$exe" --helpfull 2>&1 || true)
  grep -q -- "--metrics" <<<"$help" || { echo "[image] $exe does not run: $help" | head -5; exit 1; }
  echo "[image] $exe loads and lists its flags"
done
PYTHONPATH=pipeline/python "$py" -m kiln.make_tiny "$mnt/tmp/flux-tiny" --seed 0 >/dev/null
chown -R 10001:10001 "$mnt/tmp/flux-tiny"
start=$(date +%s)
in_image kiln-run --model /tmp/flux-tiny --package_dir /tmp/packages \
  --prompt "a lighthouse on a cliff at dusk" --width 256 --height 256 --steps 4 --seed 7 \
  --out /tmp/check.png --json >"$log_dir/kiln-run.json"
echo "[image] kiln-run in the image: $(( $(date +%s) - start )) s; $(head -c 300 "$log_dir/kiln-run.json")"
mkdir -p out
cp "$mnt/tmp/check.png" "out/image-check-$tag.png"
# The same job as `make test`'s first fixture: the same bytes are expected from the same torch.
if [ -f build/testdata/first.png ]; then
  if cmp -s build/testdata/first.png "out/image-check-$tag.png"; then
    echo "[image] the PNG is byte-identical to build/testdata/first.png (make test's fixture)"
  else
    echo "[image] note: the PNG differs from build/testdata/first.png (make test's fixture)"
  fi
fi
echo "[image] ok: out/image-check-$tag.png (logs in $log_dir)"
