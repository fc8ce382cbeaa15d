#!/usr/bin/env bash
# gpu-check.sh — the GPU checkpoint path on a real NVIDIA GPU, in one run (docs/gpu.md).
#
# Builds beam-worker here, serves examples/gpu (on_start fills >= 1 GiB of GPU memory with
# a known pattern), lets the worker checkpoint it (CUDA lock + checkpoint, CRIU dump, CUDA
# restore + unlock), checks the original still answers, stops it, starts again from the
# image (CRIU restore, CUDA restore + unlock) and checks the pattern bit for bit on the
# GPU through a request. Prints the GPU phase timings; the last line is always
#     gpu_restore_ok=<0|1> gpu_restore_gbps=<float>
# Bounded to $GPU_CHECK_BUDGET seconds (default 450, under 8 minutes). Run as root.
#
# Environment: GPU_CHECK_PYTHON (default python3: needs PyTorch with CUDA, or CuPy, and
# msgpack), GPU_CHECK_GIB (default 1), GPU_CHECK_BUDGET, BEAM_CRIU (criu binary).
# .gpu-deps/*.deb in the repo (optional): unpacked into a private prefix first, for
# machines that cannot fetch build dependencies or CRIU (docs/gpu.md).
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUDGET=${GPU_CHECK_BUDGET:-450}
T0=$(date +%s)
PY=${GPU_CHECK_PYTHON:-python3}
work=$(mktemp -d /tmp/gpu-check.XXXXXX)
ok=0
gbps=0
wpid=

say() { printf 'gpu-check: %s\n' "$*"; }
finish() {
  if [ -n "$wpid" ]; then kill -TERM "$wpid" 2>/dev/null; sleep 1; kill -KILL "$wpid" 2>/dev/null; fi
  rm -rf "$work"
  echo "gpu_restore_ok=$ok gpu_restore_gbps=$gbps"
}
trap finish EXIT
fail() { say "FAIL: $*"; exit 1; }
left() { echo $((BUDGET - ($(date +%s) - T0))); }

# ---- 1. GPU, driver, Python ----------------------------------------------------------
command -v nvidia-smi >/dev/null || fail "nvidia-smi not found: no NVIDIA driver here"
gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1) ||
  fail "nvidia-smi cannot talk to the driver"
say "GPU: $gpu"
drv=$(echo "$gpu" | awk -F', ' '{print $2}' | cut -d. -f1)
[ "${drv:-0}" -ge 570 ] 2>/dev/null || fail "driver $drv is older than r570: no CUDA checkpoint API"
PYBIN=$("$PY" -c 'import sys; print(sys.executable)') || fail "$PY does not run"
backend=$("$PY" -c 'import torch; assert torch.cuda.is_available(); print("torch", torch.__version__)' 2>/dev/null ||
          "$PY" -c 'import cupy; print("cupy", cupy.__version__)' 2>/dev/null) ||
  fail "$PYBIN has neither PyTorch with CUDA nor CuPy"
"$PY" -c 'import msgpack' 2>/dev/null || fail "$PYBIN lacks msgpack (carry its wheel)"
say "python: $PYBIN ($backend)"

# ---- 2. carried dependencies (optional) -------------------------------------------------
if compgen -G "$repo/.gpu-deps/*.deb" >/dev/null; then
  deps=$work/deps
  for f in "$repo"/.gpu-deps/*.deb; do dpkg -x "$f" "$deps" || fail "cannot unpack $f"; done
  multi=$(gcc -dumpmachine 2>/dev/null || echo x86_64-linux-gnu)
  export PATH="$deps/usr/sbin:$deps/usr/bin:$PATH"
  export PKG_CONFIG_PATH="$deps/usr/lib/$multi/pkgconfig:$deps/usr/lib/pkgconfig:$deps/usr/share/pkgconfig:${PKG_CONFIG_PATH:-}"
  export CPATH="$deps/usr/include:${CPATH:-}" LIBRARY_PATH="$deps/usr/lib/$multi:${LIBRARY_PATH:-}"
  export LD_LIBRARY_PATH="$deps/usr/lib/$multi:${LD_LIBRARY_PATH:-}"
  for pc in "$deps"/usr/lib/"$multi"/pkgconfig/*.pc "$deps"/usr/lib/pkgconfig/*.pc; do
    [ -f "$pc" ] && sed -i "s|^prefix=/usr|prefix=$deps/usr|" "$pc"
  done
  say "using carried packages from .gpu-deps"
fi

# ---- 3. CRIU ----------------------------------------------------------------------------
criu=${BEAM_CRIU:-}
for c in "$criu" /usr/local/lib/beam/criu "$(command -v criu 2>/dev/null)"; do
  [ -n "$c" ] && [ -x "$c" ] && { criu=$c; break; }
done
[ -x "${criu:-}" ] || fail "no criu binary (scripts/install-criu.sh, or carry one; CRIU >= 4.1)"
export BEAM_CRIU=$criu
CRIU_FAULT=130 timeout 60 "$criu" check >"$work/criu-check" 2>&1 ||
  fail "criu check fails here ($criu): $(tail -2 "$work/criu-check" | tr '\n' ' ')"
say "criu: $criu ($("$criu" --version | head -1))"

# ---- 4. build ---------------------------------------------------------------------------
build=$work/build
if ! cmake -S "$repo" -B "$build" -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE="$PYBIN" \
      -DBEAM_BUILD_BENCH=OFF -DBUILD_TESTING=OFF >"$work/cmake.log" 2>&1; then
  if [ -x "$repo/scripts/install-deps.sh" ] && timeout 150 "$repo/scripts/install-deps.sh" >/dev/null 2>&1 &&
     cmake -S "$repo" -B "$build" -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE="$PYBIN" \
       -DBEAM_BUILD_BENCH=OFF -DBUILD_TESTING=OFF >"$work/cmake.log" 2>&1; then :; else
    fail "cmake configure failed (missing build dependencies?): $(grep -m3 -i 'error\|not found' "$work/cmake.log" | tr '\n' ' ')"
  fi
fi
grep -m1 "GPU checkpoint:" "$work/cmake.log" | sed 's/^-- /gpu-check: /'
cmake --build "$build" --target beam-worker -j"$(nproc)" >"$work/build.log" 2>&1 ||
  fail "build failed: $(grep -m3 'error' "$work/build.log" | tr '\n' ' ')"
W=$build/beam-worker
say "built $W ($(( $(date +%s) - T0 ))s so far)"

# ---- 5. serve, checkpoint, restore --------------------------------------------------------
export PYTHONPATH="$repo/python:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
export BEAM_VOLUME_ROOT=$work/volumes GPU_CHECK_GIB=${GPU_CHECK_GIB:-1}
sock=$work/gpu.sock
start() { # $1: log name
  rm -f "$sock"
  setsid "$W" --python "$PYBIN" --socket "$sock" --checkpoint-dir "$work/ckpt" \
    --checkpoint-key gpu-check --pass-env GPU_CHECK_GIB --criu-timeout 200 --restore-timeout 200 --cuda-lock-timeout 30 \
    "$repo/examples/gpu/app.py:predict" >"$work/$1.log" 2>&1 &
  wpid=$!
  local until=$(( $(date +%s) + $(left) - 20 ))
  while ! grep -q "ready:" "$work/$1.log"; do
    kill -0 "$wpid" 2>/dev/null || { cat "$work/$1.log"; fail "worker exited during $1"; }
    [ "$(date +%s)" -lt "$until" ] || { cat "$work/$1.log"; fail "$1: not ready in time"; }
    sleep 0.2
  done
  sed 's/^/  | /' "$work/$1.log"
}
stop() { kill -TERM "$wpid"; timeout 30 tail --pid="$wpid" -f /dev/null; wpid=; }
call() { # prints the response as JSON
  timeout $(( $(left) > 30 ? $(left) - 10 : 20 )) "$PY" - "$sock" <<'EOF'
import json, sys
from beam.client import Client
with Client(sys.argv[1], timeout=300) as c:
    print(json.dumps(c.call()))
EOF
}
field() { "$PY" -c 'import json,sys; print(json.loads(sys.argv[1]).get(sys.argv[2]))' "$1" "$2"; }
prof() { # value of key $2 (without unit) in the start profile line of log $1
  grep -o "start profile:.*" "$work/$1.log" | tr ' ' '\n' | sed -n "s/^$2=\([0-9.]*\).*/\1/p" | head -1
}

start cold
grep -q "checkpoint written" "$work/cold.log" || fail "no checkpoint was written (see the log above)"
r=$(call) || fail "request to the original after the checkpoint failed"
say "original after checkpoint: $r"
[ "$(field "$r" ok)" = True ] || fail "the original's GPU memory is wrong after the checkpoint"
stop

start restore
grep -q "restored from checkpoint" "$work/restore.log" || fail "the second start did not restore"
r=$(call) || fail "request to the restored replica failed"
say "restored replica: $r"
bytes=$(field "$r" bytes)
say "dump:    gpu_lock=$(prof cold gpu_lock)ms gpu_checkpoint=$(prof cold gpu_checkpoint)ms" \
    "criu_dump=$(prof cold checkpoint)ms gpu_restore=$(prof cold gpu_restore)ms" \
    "gpu_unlock=$(prof cold gpu_unlock)ms gpu_bytes(rss estimate)=$(prof cold gpu_bytes)"
say "restore: criu_restore=$(prof restore criu_restore)ms gpu_restore=$(prof restore gpu_restore)ms" \
    "gpu_unlock=$(prof restore gpu_unlock)ms image_bytes=$(prof restore image_bytes)"
rms=$(prof restore gpu_restore)
gbps=$("$PY" -c 'import sys; b, ms = float(sys.argv[1]), float(sys.argv[2] or 0); print(f"{b / (ms / 1e3) / 1e9:.3f}" if ms > 0 else "0")' "$bytes" "${rms:-0}")
say "GPU restore: $bytes bytes on the GPU in ${rms}ms = $gbps GB/s"
if [ "$(field "$r" ok)" != True ] || [ "$(field "$r" bit_exact)" != True ]; then
  fail "the restored GPU memory differs from the pattern"
fi
stop
ok=1
say "PASS ($(( $(date +%s) - T0 ))s)"
