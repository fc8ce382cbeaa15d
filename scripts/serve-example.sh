#!/usr/bin/env bash
# serve-example.sh — install everything, then serve examples/hello with checkpointing on
# (README's first command). Ctrl-C stops it; run it again to see a restore.
#
#   scripts/serve-example.sh [APP] [beam serve options]   (default: examples/hello)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
scripts/install-deps.sh
venv=$(scripts/venv.sh | tail -n 1)

app=${1:-examples/hello/app.py:predict}
shift || true
addr=127.0.0.1:8765
cat <<MSG

Serving $app on tcp://$addr (checkpointing on; Ctrl-C to stop, run again to restore).
Call it from another terminal:

    $venv/bin/python -m beam call tcp://$addr '{"name": "Ada"}'

MSG
exec "$venv/bin/python" -m beam serve "$app" --tcp "$addr" "$@"
