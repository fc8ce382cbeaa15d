#!/usr/bin/env bash
# fleet-check.sh — many containers, one image, one shared checkpoint store (docs/deploy.md).
#
#   scripts/fleet-check.sh [--keep] [-h]
#
# Builds the images (scripts/build-image.sh; cached), then, with one host directory
# mounted as /store in every container:
#   A   checkpoint capabilities, --store /store: boots cold, checkpoints, publishes
#   A2  a new container on A's local checkpoint volume: restores from its local cache
#   B   B1..B3, different containers, each an empty local cache, --store /store: restore
#       A's image from the store without running on_start; each response must equal A's,
#       byte for byte; fleet_restore_ms is their median
#   C   as B but BEAM_TEST_COMPAT=kernel=0.0-test (a machine that does not match):
#       boots cold and logs "incompatible"
#   D   default capabilities only: serves cold and logs why
# "start to first response" is measured the same way for every container: from just before
# `podman run -d` to the first HTTP 200 of POST / (curl, polled every 5 ms), so it includes
# the container runtime's own start (a few hundred ms here) in both figures.
#
# Last line: fleet_restore_ok=<0|1> fleet_restore_ms=<B> fleet_cold_ms=<A>
# (fleet_restore_ms=na when B did not restore). Exit 0 only when every scenario passed.
#
#   --keep              leave the containers and the work dir (for debugging)
#   BEAM_FLEET_WORK=DIR work dir (default: a fresh /tmp/beam-fleet.XXXX)
#   BEAM_FLEET_PORT=N   first host port (default 18400; containers use host networking)
#   BEAM_FLEET_TIMEOUT=S  bound on the whole check, build included (default 570)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
keep=0
args=("$@") # the bounded re-exec below needs them after the loop has shifted them away
while [ $# -gt 0 ]; do
  case "$1" in
    --keep) keep=1 ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "fleet-check: unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
[ "$(id -u)" = 0 ] || { echo "fleet-check: must run as root" >&2; exit 1; }
# The whole check is bounded (CI budget: 10 minutes), image build included; on expiry the
# containers are still removed (the TERM trap below runs the EXIT trap).
if [ -z "${BEAM_FLEET_UNDER_TIMEOUT:-}" ]; then
  BEAM_FLEET_UNDER_TIMEOUT=1 exec timeout -k 15 "${BEAM_FLEET_TIMEOUT:-570}" "$0" "${args[@]}"
fi
say() { echo "fleet-check: $*" >&2; }
trap 'say "timed out or interrupted"; exit 124' TERM INT
t_all=$(date +%s)

img_line=$("$repo/scripts/build-image.sh" | tail -n 1)
say "$img_line"
image=$(sed -n 's/.*example=\([^ ]*\).*/\1/p' <<<"$img_line")
[ -n "$image" ] || { echo "fleet-check: build-image.sh printed no example image" >&2; exit 1; }

work=${BEAM_FLEET_WORK:-$(mktemp -d /tmp/beam-fleet.XXXX)}
mkdir -p "$work/store" "$work/a-cache"
port0=${BEAM_FLEET_PORT:-18400}
tag=$$
containers=()
cleanup() {
  if [ "$keep" = 1 ]; then say "kept: $work and containers ${containers[*]:-}"; return; fi
  for c in "${containers[@]}"; do podman rm -f -t 2 "$c" >/dev/null 2>&1 || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# runc: crun refuses this machine's cgroups; explicit rlimits: the defaults are refused.
# Host networking: no bridge/iptables setup is needed, each container gets its own port.
RUN=(podman run -d --runtime runc --ulimit nofile=1024:1024 --ulimit nproc=1024:1024
  --network host -v "$work/store:/store")
# The documented checkpoint set (docs/deploy.md "Capabilities"; verified minimal).
# shellcheck disable=SC2054  # one --cap-add with a comma-separated list
CKPT=(--cap-add SYS_ADMIN,NET_ADMIN,SYS_TIME --security-opt seccomp=unconfined)
# B and C need the shared store (--store); a beam without it reports fleet_restore_ok=0.
has_store=0
serve_help=$(podman run --rm --runtime runc --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 \
  "$image" serve --help 2>/dev/null || true)
if grep -q -- '--store' <<<"$serve_help"; then has_store=1; fi
store_args=()
if [ "$has_store" = 1 ]; then store_args=(--store /store); fi
# The request: its answer depends on on_start's state (the trained model and its skew).
body='{"features": [[0.1, 0.2, 0.3, 0.4], [-1.0, 0.5, 2.0, 0.0]]}'

now_ms() { date +%s%3N; }
# start NAME PORT [podman args...] -- [serve args...]: start a container; sets T0
start() {
  local name=fleet-$1-$tag port=$2; shift 2
  local pod=() srv=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do pod+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  srv=("$@")
  containers+=("$name")
  T0=$(now_ms)
  # its own hostname, as each pod has: the store's lease names the machine that holds it
  "${RUN[@]}" --name "$name" --hostname "$name" "${pod[@]}" "$image" \
    serve /app/app.py:predict --host 127.0.0.1 --port "$port" --no-auth "${srv[@]}" >/dev/null
}
# first_response NAME PORT OUTFILE: poll POST / until 200; prints ms since T0
first_response() {
  local name=fleet-$1-$tag port=$2 out=$3 deadline=$(( $(now_ms) + 90000 )) code
  while [ "$(now_ms)" -lt "$deadline" ]; do
    code=$(curl -s -o "$out" -w '%{http_code}' -H 'Content-Type: application/json' \
      --data "$body" "http://127.0.0.1:$port/" 2>/dev/null) || code=000
    if [ "$code" = 200 ]; then echo $(( $(now_ms) - T0 )); return 0; fi
    if [ "$(podman inspect -f '{{.State.Running}}' "$name" 2>/dev/null)" != true ]; then
      say "$name exited before answering"; podman logs "$name" 2>&1 | tail -n 20 >&2; return 1
    fi
    sleep 0.005
  done
  say "$name: no answer in 90 s"; podman logs "$name" 2>&1 | tail -n 20 >&2
  return 1
}
# log_grep NAME GREP-ARGS...: grep the container's log. Through a file, not a pipe: with
# pipefail, `podman logs | grep -q` fails whenever grep stops reading early (SIGPIPE).
log_grep() {
  local name=$1; shift
  podman logs "fleet-$name-$tag" >"$work/$name.log" 2>&1 || true
  grep "$@" "$work/$name.log"
}
# wait_log NAME REGEX SECONDS
wait_log() {
  local i
  for ((i = 0; i < $3 * 10; i++)); do
    if log_grep "$1" -Eq "$2"; then return 0; fi
    sleep 0.1
  done
  return 1
}
stop() { podman stop -t 10 "fleet-$1-$tag" >/dev/null 2>&1 || true; }
mode_of() { log_grep "$1" -o 'start profile: mode=[a-z]*' | sed 's/.*mode=//' | tail -n 1 || true; }

fail=0
check() {  # check NAME CONDITION-STATUS MESSAGE
  if [ "$2" = 0 ]; then say "ok   $1: $3"; else say "FAIL $1: $3"; fail=1; fi
}

# ---------------------------------------------------------------- A: cold, dump, publish
start A $((port0 + 1)) "${CKPT[@]}" -v "$work/a-cache:/var/lib/beam/checkpoints" -- "${store_args[@]}"
cold_ms=$(first_response A $((port0 + 1)) "$work/a.json") || cold_ms=
check A "$([ -n "$cold_ms" ] && [ "$(mode_of A)" = cold ]; echo $?)" "cold start to first response ${cold_ms:-?} ms (mode=$(mode_of A))"
wait_log A 'checkpoint written' 120 && a_ckpt=0 || a_ckpt=1
check A "$a_ckpt" "$(log_grep A -Eo 'checkpoint written.*' | tail -n 1 || echo 'no checkpoint written')"
if [ "$has_store" = 1 ]; then
  # publishing runs in a forked child after the dump; A must not stop before it is done
  wait_log A 'checkpoint published to store|cannot publish' 120 || true
  check A "$(log_grep A -q 'checkpoint published to store'; echo $?)" \
    "$(log_grep A -Eo '(checkpoint published to store|cannot publish).*' | tail -n 1 || echo 'not published') ($(du -sh "$work/store" | cut -f1) in the store)"
fi
stop A

# ---------------------------------------------------------------- A2: restore from local cache
start A2 $((port0 + 2)) "${CKPT[@]}" -v "$work/a-cache:/var/lib/beam/checkpoints" -- "${store_args[@]}"
local_ms=$(first_response A2 $((port0 + 2)) "$work/a2.json") || local_ms=
check A2 "$([ "$(mode_of A2)" != cold ] && [ -n "$local_ms" ] && cmp -s "$work/a.json" "$work/a2.json"; echo $?)" \
  "restart on A's cache volume: mode=$(mode_of A2), first response ${local_ms:-?} ms, answer $(cmp -s "$work/a.json" "$work/a2.json" && echo identical || echo DIFFERS)"
stop A2

# ---------------------------------------------------------------- B: restore from the store
restore_ok=0 restore_ms=na
if [ "$has_store" = 1 ]; then
  # Three containers B1..B3, each with its own empty local cache: one podman start varies
  # by a few hundred ms on this shared machine, so the figure is their median.
  b_all_ok=0 b_times=()
  for i in 1 2 3; do
    start "B$i" $((port0 + 2 + i)) "${CKPT[@]}" -- "${store_args[@]}"
    b_ms=$(first_response "B$i" $((port0 + 2 + i)) "$work/b$i.json") || b_ms=
    b_mode=$(mode_of "B$i")
    b_same=1; cmp -s "$work/a.json" "$work/b$i.json" && b_same=0
    # restored from what the store held, and on_start did not run: its start profile has
    # no on_start phase and no checkpoint was taken
    b_ok=1
    if [ -n "$b_ms" ] && [ -n "$b_mode" ] && [ "$b_mode" != cold ] && [ "$b_same" = 0 ] &&
       log_grep "B$i" -q 'checkpoint fetched from store' && ! log_grep "B$i" -q 'checkpointing ' &&
       ! log_grep "B$i" -q 'start profile:.* on_start='; then
      b_ok=0 b_times+=("$b_ms")
    else
      b_all_ok=1
    fi
    check "B$i" "$b_ok" "restore from the store: mode=${b_mode:-?}, first response ${b_ms:-?} ms, answer $([ "$b_same" = 0 ] && echo "bit-identical to A's" || echo DIFFERS); $(log_grep "B$i" -Eo 'checkpoint fetched from store.*\(.*\)' | sed 's/.*(/fetched /' | tail -n 1 || echo 'nothing fetched from the store')"
    stop "B$i"
  done
  if [ "$b_all_ok" = 0 ]; then
    restore_ok=1
    restore_ms=$(printf '%s\n' "${b_times[@]}" | sort -n | sed -n 2p)
  fi

  # -------------------------------------------------------------- C: incompatible machine
  start C $((port0 + 6)) "${CKPT[@]}" -e BEAM_TEST_COMPAT=kernel=0.0-test -- "${store_args[@]}"
  c_ms=$(first_response C $((port0 + 6)) "$work/c.json") || c_ms=
  c_ok=1
  if [ -n "$c_ms" ] && [ "$(mode_of C)" = cold ] && log_grep C -q incompatible; then c_ok=0; fi
  check C "$c_ok" "mismatched compatibility key: mode=$(mode_of C), $(log_grep C -m1 -o 'incompatible.*' || echo 'no "incompatible" line')"
  stop C
else
  say "SKIP B, C: this beam has no --store (branch wt-store not merged): no restore across containers checked"
  fail=1
fi

# ---------------------------------------------------------------- D: default capabilities
start D $((port0 + 7)) --
d_ms=$(first_response D $((port0 + 7)) "$work/d.json") || d_ms=
d_why=$(log_grep D -m1 -o 'checkpointing off.*' || true)
check D "$([ -n "$d_ms" ] && [ "$(mode_of D)" = cold ] && [ -n "$d_why" ]; echo $?)" \
  "default capabilities: mode=$(mode_of D), first response ${d_ms:-?} ms, log: ${d_why:-no reason logged}"
stop D

say "local-cache restart restore: ${local_ms:-na} ms; whole check $(( $(date +%s) - t_all )) s"
if [ "$restore_ok" = 1 ] && [ -n "$cold_ms" ]; then
  say "ratio restore/cold = $(awk -v r="$restore_ms" -v c="$cold_ms" 'BEGIN {printf "%.2f", r / c}') (goal <= 0.25)"
fi
echo "fleet_restore_ok=$restore_ok fleet_restore_ms=$restore_ms fleet_cold_ms=${cold_ms:-na}"
exit "$fail"
