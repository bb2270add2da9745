#!/usr/bin/env bash
# make demo: stream an answer from the bundled krasis-tiny model.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 -m krasisd.engine.demo "${@:-Tell me about Python modules.}"
