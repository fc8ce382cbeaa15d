#!/usr/bin/env bash
# install-deps.sh — system packages for building and testing beam (Debian 12, as root).
#
# Idempotent and fast when already done: apt-get runs only if a package is missing.
# Then provisions CRIU with scripts/install-criu.sh. Run scripts/venv.sh afterwards.
set -euo pipefail

PKGS=(build-essential cmake pkg-config libuv1-dev libmsgpack-dev libhttp-parser-dev
      libxxhash-dev libarchive-dev libzstd-dev python3-dev python3-venv clang libclang-rt-14-dev curl wrk libcap2-bin
      chromium chromium-driver prometheus podman runc debootstrap)
# chromium + chromium-driver: tests/test_dashboard.py drives the page with Selenium
# (PyPI selenium, requirements-dev.txt) and never downloads a driver; prometheus: its
# promtool checks GET /metrics (tests/test_observe.py). podman + runc + debootstrap:
# scripts/build-image.sh and scripts/fleet-check.sh (crun refuses this machine's cgroups,
# so runc; no registry is reachable, so the base image is debootstrapped).

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

if [ "$(id -u)" != 0 ]; then
  echo "install-deps: must run as root" >&2
  exit 1
fi

missing=()
for p in "${PKGS[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [ "$status" = "install ok installed" ] || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

criu_script="$here/install-criu.sh"
if [ -x "$criu_script" ]; then
  "$criu_script"
elif [ -f "$criu_script" ]; then
  bash "$criu_script"   # present but not marked executable: run it anyway
else
  echo "install-deps: $criu_script not found; skipping CRIU (checkpoints will not work)" >&2
fi
