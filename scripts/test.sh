#!/usr/bin/env bash
# test.sh — everything the tests need, then all the tests (README's test command, and
# what CI runs). Debian 12, as root: CRIU checkpoint tests really dump and restore.
#
#   1. system packages and CRIU          scripts/install-deps.sh
#   2. .venv with beam installed          scripts/venv.sh
#   3. C unit tests (ctest), then again under ASan/UBSan
#   4. the libFuzzer targets, each for BEAM_FUZZ_SECONDS (default 60) under ASan/UBSan
#   5. deploy/kubernetes/ validated offline          scripts/validate-k8s.sh
#   6. the container fleet check (image, store, caps) scripts/fleet-check.sh
#   7. end-to-end tests against the installed beam-worker (pytest), last, so that its
#      summary is the last line
#
#   BEAM_TEST_ARGS="-k foo"   extra pytest arguments
#   BEAM_FUZZ_SECONDS=0       skip fuzzing (local iterations)
#   BEAM_SKIP_FLEET=1         skip the fleet check (local iterations; CI runs it)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
jobs=${BEAM_BUILD_JOBS:-2}

step() { printf '\n== %s\n' "$*"; }

step "system packages and CRIU"
scripts/install-deps.sh

step "virtual environment"
venv=$(scripts/venv.sh | tail -n 1)
py=$venv/bin/python

step "C unit tests"
cmake -S . -B build/ctest -DPython3_EXECUTABLE=/usr/bin/python3 -DBEAM_WERROR=ON >/dev/null
cmake --build build/ctest -j"$jobs" >/dev/null
(cd build/ctest && ctest --output-on-failure)

step "C unit tests under AddressSanitizer + UndefinedBehaviorSanitizer"
cmake -S . -B build/asan -DPython3_EXECUTABLE=/usr/bin/python3 -DBEAM_SANITIZE=ON \
      -DBEAM_BUILD_BENCH=OFF >/dev/null
cmake --build build/asan -j"$jobs" >/dev/null
(cd build/asan && ctest --output-on-failure)

fuzz_seconds=${BEAM_FUZZ_SECONDS:-60}
if [ "$fuzz_seconds" -gt 0 ]; then
  step "fuzzing: each target ${fuzz_seconds}s under ASan/UBSan (docs/fuzzing.md)"
  make -s fuzz FUZZ_SECONDS="$fuzz_seconds" JOBS="$jobs"
fi

step "Kubernetes manifests (kubernetes-validate, offline)"
scripts/validate-k8s.sh

if [ "${BEAM_SKIP_FLEET:-0}" != 1 ]; then
  step "fleet check: one image, one store, many containers (docs/deploy.md)"
  # Its own last line is the figures; a failing scenario fails the run here.
  scripts/fleet-check.sh
fi

step "end-to-end tests (real beam-worker, real CRIU)"
# The installed worker, exactly as users get it.
export BEAM_WORKER_BINARY="$venv/bin/beam-worker"
# shellcheck disable=SC2086
"$py" -m pytest tests -q -p no:cacheprovider ${BEAM_TEST_ARGS:-}
