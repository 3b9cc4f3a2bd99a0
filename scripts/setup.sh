#!/usr/bin/env bash
# Prepares a fresh machine for berth: installs and starts Postgres, creates the
# `berth` role and database, and builds the test agent image offline.
# Idempotent: safe to run again.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

need=()
command -v pg_ctlcluster >/dev/null || need+=(postgresql)
# Nodes clone git resources with the host's git.
command -v git >/dev/null || need+=(git)
# The deploy tests validate deploy/compose with `docker-compose config`.
command -v docker-compose >/dev/null || need+=(docker-compose)
[ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1 || need+=(busybox-static)
# The tests' git-over-ssh server runs the system's sshd on loopback.
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
# The partition test puts a node in a network namespace of its own (`ip netns`).
command -v ip >/dev/null || need+=(iproute2)
# The webhook tests deliver with curl, as a sender would.
command -v curl >/dev/null || need+=(curl)
# The PDF export test reads the PDF back with pdftotext.
command -v pdftotext >/dev/null || need+=(poppler-utils)
# The alert rules are unit-tested with `promtool test rules`.
command -v promtool >/dev/null || need+=(prometheus)
# The engine test runs Debian's own Docker daemon in a container (nodes.engine=dind).
command -v dockerd >/dev/null || need+=(docker.io)
command -v containerd-shim-runc-v2 >/dev/null || need+=(containerd)
command -v runc >/dev/null || need+=(runc)
# The Python client is installed into a venv and tested against a dispatcher.
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
# The console's browser tests drive Debian's Chromium with Playwright.
command -v chromium >/dev/null || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  echo "==> installing ${need[*]}"
  sudo_ apt-get update -qq
  # No package starts a service: nothing is left running (sshd on :22 least of all).
  policy=/usr/sbin/policy-rc.d
  own_policy=
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | sudo_ tee "$policy" >/dev/null
    sudo_ chmod +x "$policy"
    own_policy=1
  fi
  sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  [ -z "$own_policy" ] || sudo_ rm -f "$policy"
fi

echo "==> starting Postgres"
version="$(ls /etc/postgresql | sort -n | tail -1)"
if ! pg_lsclusters -h | awk -v v="$version" '$1==v && $2=="main"' | grep -q .; then
  sudo_ pg_createcluster "$version" main >/dev/null
fi
pg_lsclusters -h | awk -v v="$version" '$1==v && $2=="main" {print $4}' | grep -q online || sudo_ pg_ctlcluster "$version" main start
for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 && break; sleep 0.5; done
sudo_ su postgres -c "psql -qtAc \"SELECT 1 FROM pg_roles WHERE rolname='berth'\"" | grep -q 1 ||
  sudo_ su postgres -c "psql -qc \"CREATE ROLE berth LOGIN SUPERUSER PASSWORD 'berth'\""
sudo_ su postgres -c "psql -qtAc \"SELECT 1 FROM pg_database WHERE datname='berth'\"" | grep -q 1 ||
  sudo_ su postgres -c "psql -qc 'CREATE DATABASE berth OWNER berth'"

echo "==> building the sandbox forwarder (berth-forward), a node binary (for the tests that kill one), the CLI (berth) and the dispatcher (for the tests that run it as a process)"
cargo build --quiet -p berth-agent-server --bin berth-forward --bin berth-agent-server -p berth-cli --bin berth -p berth-server --bin berth-dispatcher

echo "==> installing the Python client (clients/python), kubernetes-validate, helm-python-sdk, schemathesis and Playwright into .berth/venv"
[ -x "$root/.berth/venv/bin/python" ] || python3 -m venv "$root/.berth/venv"
"$root/.berth/venv/bin/pip" install --quiet --disable-pip-version-check "$root/clients/python[test]"
# ... and what builds its sdist and wheel without a network (`python -m build --no-isolation`).
"$root/.berth/venv/bin/pip" install --quiet --disable-pip-version-check "build==1.3.0" "setuptools>=70" "grpcio-tools>=1.70"
# The deploy tests validate the Kubernetes manifests against the API's schemas (offline).
"$root/.berth/venv/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==1.37.0"
# ... and render and lint the Helm chart with Helm's own engine (no helm binary).
"$root/.berth/venv/bin/pip" install --quiet --disable-pip-version-check "helm-python-sdk==0.2.2"
# ... and fuzz the HTTP API from its OpenAPI document.
"$root/.berth/venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==4.32.5"
# ... and drive the console in Chromium (the system's: no browser download).
PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 "$root/.berth/venv/bin/pip" install --quiet --disable-pip-version-check "playwright==1.65.3"

echo "==> building the test agent image"
"$root/deploy/test-image/build.sh"

echo "==> building the test container engine image (Docker in Docker)"
"$root/deploy/test-image/build-engine.sh"

echo "==> building the real Claude Code test image"
"$root/deploy/test-image/build-claude.sh"
