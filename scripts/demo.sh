#!/usr/bin/env bash
# make demo: start krasisd, pull the bundled krasis-tiny model and stream an answer with
# `krasis run`, as a user would. Everything lives under .krasis-demo/ in this checkout, so a
# daemon already running for this user is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PROMPT=${1:-"What is a Python module?"}

export KRASIS_HOME="$PWD/.krasis-demo"
export KRASIS_SOCKET="$KRASIS_HOME/krasisd.sock"
mkdir -p "$KRASIS_HOME"
krasis() { "$PYTHON" -m krasis.cli "$@"; }

"$PYTHON" -m krasisd >"$KRASIS_HOME/krasisd.log" 2>&1 &
daemon_pid=$!
trap 'kill "$daemon_pid" 2>/dev/null; wait "$daemon_pid" 2>/dev/null || true' EXIT

for _ in $(seq 1 120); do
    [ -S "$KRASIS_SOCKET" ] && krasis list >/dev/null 2>&1 && break
    kill -0 "$daemon_pid" 2>/dev/null || { cat "$KRASIS_HOME/krasisd.log"; exit 1; }
    sleep 0.5
done

echo "\$ krasis pull krasis-tiny"
krasis pull krasis-tiny
echo
echo "\$ krasis run krasis-tiny \"$PROMPT\""
krasis run --verbose krasis-tiny "$PROMPT"
echo
echo "\$ krasis ps"
krasis ps
