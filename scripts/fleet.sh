#!/usr/bin/env bash
# Starts a local berth fleet over mTLS: a development CA (`berth certs init`),
# N agent-server nodes (default 3) with a warm pool of the test image, and a
# dispatcher on :7000 that places sessions on them. Everything runs in the
# background; logs and pids are in .berth/fleet/. Stop it with
#   scripts/fleet.sh stop
#
# Usage: scripts/fleet.sh [NODES] | stop
# Environment: BERTH_WARM_POOLS (default berth-test-agent:latest=4:8),
#              BERTH_NODE_CAPACITY (default 16), and any other BERTH_* setting.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
dir=.berth/fleet

# SIGTERM: the dispatcher hands its sessions back, nodes drain (then exit
# once empty). Whatever still runs after 30 s gets a second SIGTERM: stop now.
stop() {
  local pids=()
  for pid in "$dir"/*.pid; do
    [ -e "$pid" ] || continue
    pids+=("$(cat "$pid")")
    rm -f "$pid"
  done
  [ ${#pids[@]} -gt 0 ] || return 0
  kill "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 1 150); do
    local alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 1 ] || return 0
    sleep 0.2
  done
  kill "${pids[@]}" 2>/dev/null || true
}

if [ "${1:-}" = "stop" ]; then
  stop
  echo "fleet stopped (nodes remove their containers as they exit)"
  exit 0
fi
nodes="${1:-3}"

scripts/setup.sh
echo "==> building berth"
cargo build --quiet -p berth-server -p berth-agent-server -p berth-cli
mkdir -p "$dir"
stop
if [ ! -f "$dir/certs/ca.pem" ]; then
  echo "==> making a development CA and certificates in $dir/certs"
  target/debug/berth certs init --dir "$dir/certs" --node localhost >/dev/null
fi
export BERTH_TLS_CA="$dir/certs/ca.pem"
export BERTH_WARM_POOLS="${BERTH_WARM_POOLS:-berth-test-agent:latest=4:8}"

urls=()
for i in $(seq 0 $((nodes - 1))); do
  port=$((7441 + i))
  echo "==> node-$i on https://localhost:$port"
  BERTH_NODE_ID="node-$i" BERTH_NODE_LISTEN="127.0.0.1:$port" BERTH_METRICS_LISTEN="127.0.0.1:$((9401 + i))" \
    BERTH_TLS_CERT="$dir/certs/node-localhost.pem" BERTH_TLS_KEY="$dir/certs/node-localhost-key.pem" \
    nohup target/debug/berth-agent-server > "$dir/node-$i.log" 2>&1 &
  echo $! > "$dir/node-$i.pid"
  urls+=("https://localhost:$port")
done

if [ ! -f "$dir/secrets.key" ]; then
  (umask 077; printf 'k1:%s\n' "$(head -c32 /dev/urandom | base64 -w0)" > "$dir/secrets.key")
fi
echo "==> dispatcher on :7000, AGENT_SERVERS=$(IFS=,; echo "${urls[*]}")"
AGENT_SERVERS="$(IFS=,; echo "${urls[*]}")" \
  BERTH_TLS_CERT="$dir/certs/dispatcher.pem" BERTH_TLS_KEY="$dir/certs/dispatcher-key.pem" \
  BERTH_SECRETS_KEY_FILE="$dir/secrets.key" BERTH_BOOTSTRAP_TOKEN_FILE="$dir/admin.token" \
  nohup target/debug/berth-dispatcher > "$dir/dispatcher.log" 2>&1 &
echo $! > "$dir/dispatcher.pid"
target/debug/berth config set-context fleet --dispatcher http://127.0.0.1:7000 \
  --token-file "$(cd "$dir" && pwd)/admin.token" --use-it >/dev/null

for _ in $(seq 1 100); do
  up=$(target/debug/berth nodes --json 2>/dev/null | grep -c '"state":"NODE_STATE_UP"' || true)
  [ "$up" -ge "$nodes" ] && break
  sleep 0.2
done
target/debug/berth nodes
echo
echo "fleet running — try: target/debug/berth run --image berth-test-agent:latest \"echo hello\""
echo "metrics: http://127.0.0.1:9400/metrics (dispatcher), :9401.. (nodes); /readyz on each"
echo "stop it with: scripts/fleet.sh stop (a node alone: kill -TERM \$(cat $dir/node-0.pid) drains it)"
