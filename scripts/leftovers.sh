#!/usr/bin/env bash
# Counts what berth made in Docker that is still there: containers and
# volumes labelled berth.managed. `scripts/leftovers.sh` prints the count;
# `scripts/leftovers.sh check N` fails (listing them) when more than N are
# left, as after the test suite, whose clusters must remove all they made.
set -euo pipefail
count() {
  local c v
  c=$(docker ps -aq --filter label=berth.managed=true | wc -l)
  v=$(docker volume ls -q --filter label=berth.managed=true | wc -l)
  echo $((c + v))
}
case "${1:-count}" in
  count) count ;;
  check)
    before="${2:-0}"
    now=$(count)
    if [ "$now" -gt "$before" ]; then
      echo "berth left $((now - before)) containers or volumes behind:" >&2
      docker ps -a --filter label=berth.managed=true --format '  container {{.Names}} {{.Status}} {{.Labels}}' >&2
      docker volume ls --filter label=berth.managed=true --format '  volume {{.Name}} {{.Labels}}' >&2
      exit 1
    fi
    echo "no containers or volumes left behind ($now berth-labelled, $before before)"
    ;;
  *) echo "usage: scripts/leftovers.sh [count | check N]" >&2; exit 2 ;;
esac
