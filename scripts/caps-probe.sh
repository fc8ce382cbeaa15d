#!/usr/bin/env bash
# caps-probe.sh — which capabilities does checkpointing inside a container need? Try it.
#
#   scripts/caps-probe.sh [IMAGE]        (default beam-example-ml:latest; build-image.sh)
#
# For each candidate capability set, one container (its own network namespace, as a
# Kubernetes pod has) boots the app cold and checkpoints it into a fresh volume, then a
# second container with the same set restores from that volume. Prints one line per set:
#   caps=<set> tun=<0|1> seccomp=<unconfined|default> dump=<ok|FAIL> restore=<ok|FAIL|->
#   and the first CRIU error
# docs/deploy.md ("Capabilities") records what this printed on the project's machines.
set -euo pipefail

image=${1:-beam-example-ml:latest}
[ "$(id -u)" = 0 ] || { echo "caps-probe: must run as root" >&2; exit 1; }
work=$(mktemp -d /tmp/beam-caps.XXXX)
names=()
cleanup() {
  for n in "${names[@]}"; do podman rm -f -t 1 "$n" >/dev/null 2>&1 || true; done
  rm -rf "$work"
}
trap cleanup EXIT
base=(podman run -d --runtime runc --ulimit nofile=1024:1024 --ulimit nproc=1024:1024)

# run_one NAME CACHE CAPS TUN SECCOMP: start, wait until it serves, keep its log
run_one() {
  local name=$1 cache=$2 caps=$3 tun=$4 seccomp=$5 args=() i
  [ -n "$caps" ] && args+=(--cap-add "$caps")
  [ "$seccomp" = unconfined ] && args+=(--security-opt seccomp=unconfined)
  [ "$tun" = 1 ] && args+=(--device /dev/net/tun)
  names+=("$name")
  "${base[@]}" --name "$name" "${args[@]}" -v "$cache:/var/lib/beam/checkpoints" "$image" \
    serve /app/app.py:predict --host 127.0.0.1 --port 8080 --no-auth >/dev/null
  for ((i = 0; i < 600; i++)); do
    if podman logs "$name" 2>&1 | grep -Eq 'checkpoint written|not checkpointing|checkpointing off|booting cold|mode=restore'; then
      # a cold boot that checkpoints logs "checkpoint written" after serving starts
      if podman logs "$name" 2>&1 | grep -q 'start profile'; then break; fi
    fi
    sleep 0.1
  done
  sleep 0.5
  podman logs "$name" >"$work/$name.log" 2>&1 || true
  podman rm -f -t 2 "$name" >/dev/null 2>&1 || true
}
first_error() {
  grep -Eo '(Error \([^)]*\): .*|not checkpointing.*|checkpoint unusable.*|checkpointing off.*|booting cold.*)' "$1" |
    grep -v RLIMIT_NOFILE | head -n 1 | cut -c1-160 || true
}

probe() {  # probe CAPS TUN [SECCOMP: unconfined (default) | default]
  local caps=$1 tun=$2 seccomp=${3:-unconfined} id cache dump restore err
  id=$(echo "$caps-$tun-$seccomp" | tr ',' '_' | tr -cd 'A-Za-z0-9_-')
  cache=$work/cache-$id
  mkdir -p "$cache"
  run_one "caps-d-$id" "$cache" "$caps" "$tun" "$seccomp"
  dump=FAIL restore=-
  err=$(first_error "$work/caps-d-$id.log")
  if grep -q 'checkpoint written' "$work/caps-d-$id.log"; then
    dump=ok
    run_one "caps-r-$id" "$cache" "$caps" "$tun" "$seccomp"
    if grep -q 'mode=restore' "$work/caps-r-$id.log"; then restore=ok; else
      restore=FAIL; err=$(first_error "$work/caps-r-$id.log"); fi
  fi
  echo "caps=${caps:-default} tun=$tun seccomp=$seccomp dump=$dump restore=$restore ${err:+error: $err}"
}

# Start from the set that worked (the shared CRIU notes) and take one thing away each
# time: first NET_ADMIN, then SYS_RESOURCE (giving $min), then from $min the device and
# each remaining capability but SYS_ADMIN (without it there is no PID namespace at all).
all=SYS_ADMIN,CHECKPOINT_RESTORE,SYS_PTRACE,NET_ADMIN,SYS_RESOURCE,SYS_TIME
min=SYS_ADMIN,CHECKPOINT_RESTORE,SYS_PTRACE,NET_ADMIN,SYS_TIME
without() { tr ',' '\n' <<<"$min" | grep -vx "$1" | paste -sd,; }
probe "$all" 1
probe "$(tr ',' '\n' <<<"$all" | grep -vx NET_ADMIN | paste -sd,)" 1
probe "$min" 1                                   # - SYS_RESOURCE
probe "$min" 0                                   # - /dev/net/tun
for cap in SYS_PTRACE CHECKPOINT_RESTORE SYS_TIME; do probe "$(without "$cap")" 1; done
# what the lines above leave: SYS_ADMIN, NET_ADMIN, SYS_TIME; then without seccomp=unconfined
probe SYS_ADMIN,NET_ADMIN,SYS_TIME 0
probe SYS_ADMIN,NET_ADMIN,SYS_TIME 0 default
probe "" 0                                       # default capabilities
