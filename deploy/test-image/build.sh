#!/usr/bin/env bash
# Builds berth's test agent image offline (no registry): a root filesystem with
# Debian's busybox-static, the project's fake `claude` and fake-anthropic (its stdio MCP
# server), with the shared libraries they link, and the public Claude Code captures from
# ../shared, imported with `docker import`.
#
# Usage: deploy/test-image/build.sh [IMAGE]      (default berth-test-agent:latest)
set -euo pipefail
image="${1:-berth-test-agent:latest}"
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"

busybox=/bin/busybox
if [ ! -x "$busybox" ] || ldd "$busybox" >/dev/null 2>&1; then
  echo "build.sh: needs a static busybox at /bin/busybox: apt-get install busybox-static" >&2
  exit 1
fi

echo "==> building fake-claude and fake-anthropic (its stdio MCP server)"
cargo build --quiet -p berth-fake-claude -p berth-fake-anthropic
fake="${CARGO_TARGET_DIR:-$root/target}/debug/fake-claude"
mcp="${CARGO_TARGET_DIR:-$root/target}/debug/fake-anthropic"

rootfs="$(mktemp -d)"
# mktemp makes it 0700: the image's / would be closed to the agent's user on
# engines that keep the mode (vfs, a Docker-in-Docker sidecar's).
chmod 755 "$rootfs"
trap 'rm -rf "$rootfs"' EXIT
mkdir -p "$rootfs"/{bin,usr/local/bin,etc,tmp,workspace,home/agent,fixtures,lib,lib64}
cp "$busybox" "$rootfs/bin/busybox"
for applet in $("$busybox" --list); do
  [ -e "$rootfs/bin/$applet" ] || ln -s busybox "$rootfs/bin/$applet"
done
cp "$fake" "$rootfs/usr/local/bin/claude"
cp "$mcp" "$rootfs/usr/local/bin/fake-anthropic"
# The shared libraries they link, at the same paths.
for lib in $(ldd "$fake" "$mcp" | grep -oE '/[^ ]+\.so[^ ]*' | sort -u); do
  mkdir -p "$rootfs$(dirname "$lib")"
  cp -L "$lib" "$rootfs$lib"
done
# The public Claude Code captures, read in place (the project keeps no copy).
shared="${BERTH_SHARED_FIXTURES:-$root/../shared/fixtures/claude-code}"
if [ ! -f "$shared/explore_count_files.jsonl" ]; then
  echo "build.sh: no Claude Code captures at $shared (set BERTH_SHARED_FIXTURES)" >&2
  exit 1
fi
mkdir -p "$rootfs/fixtures/claude-code"
cp -r "$shared/." "$rootfs/fixtures/claude-code/"
chmod -R u+w,a+rX "$rootfs/fixtures"
printf 'root:x:0:0:root:/root:/bin/sh\nagent:x:1000:1000:agent:/home/agent:/bin/sh\n' > "$rootfs/etc/passwd"
printf 'root:x:0:\nagent:x:1000:\n' > "$rootfs/etc/group"
chmod 1777 "$rootfs/tmp"
chown -R 1000:1000 "$rootfs/workspace" "$rootfs/home/agent" 2>/dev/null || true

echo "==> importing $image"
tar --numeric-owner -C "$rootfs" -c . | docker import \
  --change 'USER 1000:1000' \
  --change 'WORKDIR /workspace' \
  --change 'ENV HOME=/home/agent PATH=/usr/local/bin:/bin' \
  --change 'CMD ["tail", "-f", "/dev/null"]' \
  - "$image" >/dev/null
echo "==> built $image"
