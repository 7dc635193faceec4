#!/usr/bin/env bash
# Makes the base image the Containerfile starts FROM when no image registry can be reached:
# a minimal Debian bookworm made with debootstrap, imported into podman's store as
# localhost/kiln-base:bookworm. Does nothing when that image exists. Called by build.sh.
set -euo pipefail
IMAGE=${KILN_BASE_IMAGE:-localhost/kiln-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
if podman image exists "$IMAGE"; then
  echo "[image] base $IMAGE: present"
  exit 0
fi
root=$(mktemp -d /var/tmp/kiln-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "[image] base: debootstrap bookworm (minbase) from $MIRROR into $root"
start=$(date +%s)
nice -n 10 debootstrap --variant=minbase bookworm "$root" "$MIRROR" >"$root.log" 2>&1 ||
  { tail -20 "$root.log"; exit 1; }
rm -f "$root.log"
# Without this, apt in the image keeps downloaded .debs and the lists of the bootstrap.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | podman import --message "debootstrap bookworm minbase" - "$IMAGE" >/dev/null
echo "[image] base $IMAGE imported in $(( $(date +%s) - start )) s"
