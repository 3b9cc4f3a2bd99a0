#!/usr/bin/env bash
# Starts berth (a dispatcher with one in-process node) and runs a demo session
# on the fake agent. The dispatcher keeps running afterwards; its log is in
# .berth/dispatcher.log and `kill $(cat .berth/dispatcher.pid)` stops it.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
scripts/setup.sh
echo "==> building berth"
cargo build --quiet -p berth-server -p berth-agent-server -p berth-cli
mkdir -p .berth
if [ -f .berth/dispatcher.pid ] && kill -0 "$(cat .berth/dispatcher.pid)" 2>/dev/null; then
  echo "==> dispatcher already running (pid $(cat .berth/dispatcher.pid))"
else
  # Secrets and env values are encrypted at rest under this key file.
  if [ ! -f .berth/secrets.key ]; then
    (umask 077; printf 'k1:%s\n' "$(head -c32 /dev/urandom | base64 -w0)" > .berth/secrets.key)
  fi
  echo "==> starting the dispatcher on :7000 (log: .berth/dispatcher.log)"
  # The first start makes a fleet-admin API key and writes it to .berth/admin.token.
  BERTH_SECRETS_KEY_FILE="$root/.berth/secrets.key" BERTH_BOOTSTRAP_TOKEN_FILE="$root/.berth/admin.token" \
    nohup target/debug/berth-dispatcher > .berth/dispatcher.log 2>&1 &
  echo $! > .berth/dispatcher.pid
fi
# The CLI's context `local`: this dispatcher, with that key.
target/debug/berth config set-context local --dispatcher http://127.0.0.1:7000 \
  --token-file "$root/.berth/admin.token" --use-it >/dev/null
for _ in $(seq 1 50); do
  target/debug/berth sessions list >/dev/null 2>&1 && break
  sleep 0.2
done
echo "==> berth run --image berth-test-agent:latest \"tool ls -la\""
target/debug/berth run --image berth-test-agent:latest "tool ls -la"
echo
echo "==> replaying a recorded Claude Code transcript"
target/debug/berth run --image berth-test-agent:latest "replay /fixtures/claude-code/explore_count_files.jsonl"
echo
echo "==> a durable session: write a file, pause (snapshot), resume, read it back"
B=target/debug/berth
id=$($B --json run --keep --image berth-test-agent:latest "write notes.txt kept across pause" \
  | grep -o '"sessionId":"[^"]*"' | head -1 | cut -d'"' -f4)
$B sessions pause "$id"
for _ in $(seq 1 100); do
  $B sessions get "$id" | grep -q '^status  *paused' && break
  sleep 0.2
done
$B sessions get "$id" | grep -E '^(status|snapshot)'
$B sessions resume "$id"
$B sessions send "$id" "read notes.txt" >/dev/null
for _ in $(seq 1 100); do
  $B sessions events "$id" | grep -v '^>' | grep -q 'kept across pause' && break
  sleep 0.2
done
echo "after resume, the agent read back: $($B sessions events "$id" | grep -v '^>' | grep 'kept across pause' | tail -1)"
$B sessions stop "$id" >/dev/null
echo
echo "==> a tool approval: the agent asks to write a file; a person allows it"
$B run --keep --image berth-test-agent:latest "edit approved.txt allowed by a person" > .berth/approval.log 2>&1 &
run_pid=$!
for _ in $(seq 1 100); do
  $B sessions list --waiting | grep -q 'waiting:' && break
  sleep 0.2
done
$B sessions list --waiting
id=$($B --json sessions list --waiting | grep -o '"id":"[^"]*"' | head -1 | cut -d'"' -f4)
$B sessions approve "$id"
wait "$run_pid" || true
grep -E 'File created|asks permission' .berth/approval.log || true
$B sessions stop "$id" >/dev/null
echo
echo "berth is running at http://127.0.0.1:7000 — try: target/debug/berth sessions list"
echo "metrics: http://127.0.0.1:9400/metrics, health: /healthz, readiness: /readyz"
