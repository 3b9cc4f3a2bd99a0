#!/usr/bin/env bash
# Builds berth's test container engine image offline (no registry): Debian's
# dockerd, containerd, containerd-shim-runc-v2 and runc (with the shared
# libraries they link) on a static busybox, imported with `docker import`.
#
# The tests run it privileged, as the chart's `nodes.engine=dind` sidecar
# runs, with no network but its own loopback: a Docker daemon that is not
# the host's, with its own data root, reached only through the socket it
# serves on a directory the test shares with it.
#
# Usage: deploy/test-image/build-engine.sh [IMAGE]   (default berth-test-engine:latest)
set -euo pipefail
image="${1:-berth-test-engine:latest}"

busybox=/bin/busybox
if [ ! -x "$busybox" ] || ldd "$busybox" >/dev/null 2>&1; then
  echo "build-engine.sh: needs a static busybox at /bin/busybox: apt-get install busybox-static" >&2
  exit 1
fi
bins=()
for b in dockerd containerd containerd-shim-runc-v2 runc docker-init; do
  path="$(command -v "$b" || true)"
  if [ -z "$path" ]; then
    echo "build-engine.sh: no $b: apt-get install docker.io containerd runc" >&2
    exit 1
  fi
  bins+=("$path")
done

rootfs="$(mktemp -d)"
# mktemp makes it 0700: the image's / would be closed to the agent's user on
# engines that keep the mode (vfs, a Docker-in-Docker sidecar's).
chmod 755 "$rootfs"
trap 'rm -rf "$rootfs"' EXIT
mkdir -p "$rootfs"/{bin,usr/local/bin,etc,tmp,run,var/lib/docker,lib,lib64}
cp "$busybox" "$rootfs/bin/busybox"
for applet in $("$busybox" --list); do
  [ -e "$rootfs/bin/$applet" ] || ln -s busybox "$rootfs/bin/$applet"
done
for b in "${bins[@]}"; do
  cp -L "$b" "$rootfs/usr/local/bin/$(basename "$b")"
  for lib in $(ldd "$b" 2>/dev/null | grep -oE '/[^ ]+\.so[^ ]*' || true); do
    mkdir -p "$rootfs$(dirname "$lib")"
    [ -e "$rootfs$lib" ] || cp -L "$lib" "$rootfs$lib"
  done
done
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$rootfs/etc/passwd"
printf 'root:x:0:\ndocker:x:999:\n' > "$rootfs/etc/group"
chmod 1777 "$rootfs/tmp"

echo "==> importing $image"
tar --numeric-owner -C "$rootfs" -c . | docker import \
  --change 'ENV PATH=/usr/local/bin:/bin' \
  --change 'ENTRYPOINT ["dockerd"]' \
  - "$image" >/dev/null
echo "==> built $image"
