#!/usr/bin/env bash
# Builds berth's second test image offline: the real Claude Code CLI, taken
# from the pinned `claude-agent-sdk` wheel on PyPI (its manylinux x86_64 build
# bundles the CLI as `claude_agent_sdk/_bundled/claude`, linked against glibc),
# beside the project's `fake-anthropic` stand-in for the Messages API.
# Imported with `docker import` (no registry). The binary is cached under
# .berth/cache, never committed.
#
# The image points the CLI at http://127.0.0.1:8787 (ANTHROPIC_BASE_URL): the
# container's own loopback, where `fake-anthropic` serves when it is the
# container's main process. No traffic leaves the container.
#
# Usage: deploy/test-image/build-claude.sh [IMAGE]   (default berth-test-claude:latest)
set -euo pipefail
image="${1:-berth-test-claude:latest}"
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"

# Pinned: the wheel's version and its sha256 (Claude Code 2.1.332).
version=0.2.189
wheel="claude_agent_sdk-${version}-py3-none-manylinux_2_17_x86_64.whl"
sha256=b26a6a30a4e2cb025a6f5c95e1ce4469b38fcc51015c392f627bea7c948d67ad

busybox=/bin/busybox
if [ ! -x "$busybox" ] || ldd "$busybox" >/dev/null 2>&1; then
  echo "build-claude.sh: needs a static busybox at /bin/busybox: apt-get install busybox-static" >&2
  exit 1
fi

cache="${BERTH_CACHE_DIR:-$root/.berth/cache}"
mkdir -p "$cache"
if [ ! -f "$cache/$wheel" ]; then
  echo "==> downloading claude-agent-sdk $version from PyPI"
  python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --platform manylinux_2_17_x86_64 --python-version 3.11 \
    "claude-agent-sdk==$version" -d "$cache"
fi
if ! echo "$sha256  $cache/$wheel" | sha256sum -c --quiet -; then
  echo "build-claude.sh: $cache/$wheel does not have the pinned sha256 $sha256; removed it, run again" >&2
  rm -f "$cache/$wheel"
  exit 1
fi
claude="$cache/claude-$version"
if [ ! -x "$claude" ]; then
  echo "==> extracting the bundled CLI"
  python3 - "$cache/$wheel" "$claude" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("claude_agent_sdk/_bundled/claude") as src, open(sys.argv[2] + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  chmod +x "$claude.part"
  mv "$claude.part" "$claude"
fi

echo "==> building fake-anthropic"
cargo build --quiet -p berth-fake-anthropic
fake="${CARGO_TARGET_DIR:-$root/target}/debug/fake-anthropic"

rootfs="$(mktemp -d)"
# mktemp makes it 0700: the image's / would be closed to the agent's user on
# engines that keep the mode (vfs, a Docker-in-Docker sidecar's).
chmod 755 "$rootfs"
trap 'rm -rf "$rootfs"' EXIT
mkdir -p "$rootfs"/{bin,usr/local/bin,etc,tmp,workspace,home/agent,lib,lib64}
cp "$busybox" "$rootfs/bin/busybox"
for applet in $("$busybox" --list); do
  [ -e "$rootfs/bin/$applet" ] || ln -s busybox "$rootfs/bin/$applet"
done
cp "$claude" "$rootfs/usr/local/bin/claude"
cp "$fake" "$rootfs/usr/local/bin/fake-anthropic"
# The shared libraries both link, at the same paths.
for bin in "$claude" "$fake"; do
  for lib in $(ldd "$bin" | grep -oE '/[^ ]+\.so[^ ]*'); do
    mkdir -p "$rootfs$(dirname "$lib")"
    cp -L "$lib" "$rootfs$lib"
  done
done
printf 'root:x:0:0:root:/root:/bin/sh\nagent:x:1000:1000:agent:/home/agent:/bin/sh\n' > "$rootfs/etc/passwd"
printf 'root:x:0:\nagent:x:1000:\n' > "$rootfs/etc/group"
chmod 1777 "$rootfs/tmp"
chown -R 1000:1000 "$rootfs/workspace" "$rootfs/home/agent" 2>/dev/null || true

echo "==> importing $image"
tar --numeric-owner -C "$rootfs" -c . | docker import \
  --change 'USER 1000:1000' \
  --change 'WORKDIR /workspace' \
  --change 'ENV HOME=/home/agent PATH=/usr/local/bin:/bin ANTHROPIC_BASE_URL=http://127.0.0.1:8787 CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 DISABLE_AUTOUPDATER=1' \
  --change 'CMD ["fake-anthropic", "--listen", "127.0.0.1:8787", "--log", "/tmp/anthropic-requests.jsonl"]' \
  - "$image" >/dev/null
echo "==> built $image"
