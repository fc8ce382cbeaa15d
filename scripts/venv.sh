#!/usr/bin/env bash
# venv.sh — create ./.venv (from Debian's /usr/bin/python3) and install beam plus the
# test/bench dependencies into it. Idempotent: skips what is already up to date.
#
#   BEAM_VENV=DIR          venv location (default: <repo>/.venv)
#   BEAM_FORCE_INSTALL=1   reinstall beam even if its sources did not change
#   BEAM_CMAKE_ARGS=...    extra CMake arguments for the worker build (forces a reinstall)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${BEAM_VENV:-$repo/.venv}
py=$venv/bin/python

if ! [ -x "$py" ] || ! "$py" -c 'import sys' 2>/dev/null; then
  rm -rf "$venv"
  /usr/bin/python3 -m venv "$venv"
fi

# requirements-dev.txt: reinstall only when it changed
req=$repo/requirements-dev.txt
req_stamp=$venv/.beam-requirements.sha256
req_sum=$(sha256sum "$req" | cut -d' ' -f1)
if [ "$(cat "$req_stamp" 2>/dev/null || true)" != "$req_sum" ]; then
  "$py" -m pip install -q --disable-pip-version-check -r "$req"
  echo "$req_sum" >"$req_stamp"
fi

# beam itself: reinstall when its sources (or the build args) changed
src_stamp=$venv/.beam-install.sha256
src_sum=$(cd "$repo" && {
  find python csrc setup.py pyproject.toml CMakeLists.txt MANIFEST.in cmake \
       -type f ! -path '*/__pycache__/*' ! -path '*.egg-info/*' 2>/dev/null | LC_ALL=C sort | xargs -r sha256sum
  echo "cmake_args=${BEAM_CMAKE_ARGS:-}"
} | sha256sum | cut -d' ' -f1)
if [ "${BEAM_FORCE_INSTALL:-0}" = 1 ] || [ "$(cat "$src_stamp" 2>/dev/null || true)" != "$src_sum" ] \
   || ! [ -x "$venv/bin/beam-worker" ]; then
  rm -f "$src_stamp"
  (cd "$repo" && "$py" -m pip install -q --disable-pip-version-check .)
  echo "$src_sum" >"$src_stamp"
fi

echo "$venv"
