#!/usr/bin/env bash
# install-criu.sh — provision a CRIU binary that works on the running kernel.
#
# Runs as root on Debian 12 (bookworm). Idempotent; quiet unless something
# fails; on success the last (only) line of stdout is
#     criu_bin=<path> criu_version=X.Y.Z
# See docs/criu-provisioning.md for the why and the measurements.
#
# Our builds carry the patches in scripts/criu-patches/<X.Y.Z>/ (applied in name
# order; today: 4.2.1 reads big anonymous regions into huge pages at restore). A
# cached build is used only if it was built with exactly those patches; otherwise the
# script rebuilds, and only if that build fails does it fall back to an older cached
# build or the system's criu (whichever passes `criu check`).
#
# Usage: scripts/install-criu.sh [--kdat-tmpfs|--no-kdat-tmpfs] [--force-build] [-v]
#
# Environment:
#   BEAM_CRIU_CACHE           build cache root        (default /var/cache/beam/criu)
#   BEAM_CRIU_PREFIX          dir of the stable link   (default /usr/local/lib/beam)
#   BEAM_CRIU_KDAT_TMPFS      1/0: mount a tmpfs for CRIU's kerndat cache
#                             (default: 1 when root and the dir is not tmpfs yet)
#   BEAM_CRIU_SOURCE_VERSIONS Debian source versions to try, in order
#                             (default "4.2.1-1 4.1.1-1")
#   BEAM_CRIU_VERBOSE         1: progress on stderr
set -Eeuo pipefail

CACHE_ROOT=${BEAM_CRIU_CACHE:-/var/cache/beam/criu}
PREFIX=${BEAM_CRIU_PREFIX:-/usr/local/lib/beam}
SOURCE_VERSIONS=${BEAM_CRIU_SOURCE_VERSIONS:-"4.2.1-1 4.1.1-1"}
KDAT_TMPFS=${BEAM_CRIU_KDAT_TMPFS:-auto}
VERBOSE=${BEAM_CRIU_VERBOSE:-0}
FORCE_BUILD=0

# Directory our own build keeps its kerndat cache in (CRIU's RUNDIR; upstream
# default is /run, which is not tmpfs on these machines, and mounting over /run
# would hide dbus/systemd/postgres state). Baked into the binary at build time.
KDAT_DIR=/run/beam-criu
# Bump rev when build flags change so cached binaries are rebuilt; the patch set of
# the version is part of the id too, so adding or changing a patch rebuilds.
BUILD_REV=2
PATCH_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/criu-patches
patches_of() { compgen -G "$PATCH_ROOT/$1/*.patch" | LC_ALL=C sort || true; }  # $1 = X.Y.Z
build_id() {  # $1 = X.Y.Z
  local sum=none
  if [ -n "$(patches_of "$1")" ]; then
    sum=$(patches_of "$1" | xargs cat | sha256sum | cut -c1-16)
  fi
  echo "rundir=${KDAT_DIR};rev=${BUILD_REV};patches=${sum}"
}

APT_PKGS=(criu build-essential patch python3 libbsd-dev libcap-dev libgnutls28-dev
  libnet1-dev libnftables-dev libnl-3-dev libprotobuf-c-dev libprotobuf-dev
  pkgconf protobuf-c-compiler protobuf-compiler uuid-dev)

while [ $# -gt 0 ]; do
  case "$1" in
    --kdat-tmpfs) KDAT_TMPFS=1 ;;
    --no-kdat-tmpfs) KDAT_TMPFS=0 ;;
    --force-build) FORCE_BUILD=1 ;;
    -v|--verbose) VERBOSE=1 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "install-criu: unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

[ "$(id -u)" = 0 ] || { echo "install-criu: must run as root" >&2; exit 1; }

WORK=$(mktemp -d /tmp/install-criu.XXXXXX)
LOG=$WORK/log
: >"$LOG"
SMOKE_PID=

cleanup() {
  if [ -n "$SMOKE_PID" ]; then kill -KILL "$SMOKE_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT
on_err() {
  local rc=$? line=$1
  echo "install-criu: FAILED (exit $rc) at line $line: $BASH_COMMAND" >&2
  if [ -s "$LOG" ]; then echo "--- last lines of log ---" >&2; tail -n 40 "$LOG" >&2; fi
}
trap 'on_err $LINENO' ERR

say() { if [ "$VERBOSE" = 1 ]; then echo "install-criu: $*" >&2; fi; echo "== $*" >>"$LOG"; }
die() { echo "install-criu: $*" >&2; if [ -s "$LOG" ]; then tail -n 40 "$LOG" >&2; fi; trap - ERR; exit 1; }
# run CMD... with output to the log
q() { echo "+ $*" >>"$LOG"; "$@" >>"$LOG" 2>&1; }

export DEBIAN_FRONTEND=noninteractive
# Every CRIU call: no hardware breakpoints (they never fire in these VMs, so
# dump hangs without this) and a hard time bound.
crun() { CRIU_FAULT=130 timeout -k 5 60 "$@"; }

mkdir -p "$CACHE_ROOT"
exec 9>"$CACHE_ROOT/.lock"
flock -w 600 9 || die "could not lock $CACHE_ROOT/.lock"

# ---------------------------------------------------------------- 1. packages
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null | grep -qx installed || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "apt-get install ${missing[*]}"
  q apt-get -q update
  q apt-get -q -y --no-install-recommends install "${missing[@]}"
fi

# ---------------------------------------------------------------- helpers
criu_ok() {  # $1 = criu binary; passes `criu check` on this kernel?
  local out
  out=$(crun "$1" check 2>&1) && return 0
  grep -q 'Looks good' <<<"$out" && return 0
  echo "$1 check failed: $out" >>"$LOG"
  return 1
}
criu_ver() { "$1" --version 2>/dev/null | awk '/^Version:/ {print $2; exit}'; }

# The Debian mirror this machine already uses (from its own apt sources).
mirror_uri() {
  local codename uri
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
  uri=$(apt-get indextargets --no-release-info --format '$(REPO_URI) $(RELEASE)' 2>/dev/null |
    awk -v c="$codename" '$2 == c {print $1; exit}')
  [ -n "$uri" ] || uri=$(apt-get indextargets --no-release-info --format '$(REPO_URI) $(RELEASE)' 2>/dev/null |
    awk '$2 !~ /security/ && $1 ~ /debian\/?$/ {print $1; exit}')
  echo "${uri:-http://deb.debian.org/debian/}"
}

# Private apt state: the system's sources, lists and caches stay untouched.
APT_PRIV=()
setup_private_apt() {
  local d=$WORK/apt keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  mkdir -p "$d/sources.d" "$d/lists/partial" "$d/cache/archives/partial"
  {
    echo "Types: deb-src"
    echo "URIs: ${MIRROR%/}"
    echo "Suites: sid trixie"
    echo "Components: main"
    if [ -r "$keyring" ]; then echo "Signed-By: $keyring"; fi
  } >"$d/sources.d/beam-criu-src.sources"
  APT_PRIV=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$d/sources.d"
    -o "Dir::State::Lists=$d/lists" -o "Dir::Cache=$d/cache")
  q apt-get -q "${APT_PRIV[@]}" update
}

# "DIR SHA256 SIZE FILE" of criu's orig tarball for Debian version $1.
src_entry() {
  apt-cache "${APT_PRIV[@]}" showsrc criu 2>>"$LOG" | awk -v want="$1" '
    function emit() { if (pkg == "criu" && ver == want && sha != "") { print dir, sha, size, file; found = 1; exit } }
    /^$/          { emit(); pkg = ver = dir = sha = size = file = ""; next }
    /^[^ ]/       { insha = ($1 == "Checksums-Sha256:") }
    /^Package:/   { pkg = $2 }
    /^Version:/   { ver = $2 }
    /^Directory:/ { dir = $2 }
    /^ / && insha && $3 ~ /\.orig\.tar\.(xz|gz|bz2)$/ { sha = $1; size = $2; file = $3 }
    END           { if (!found) emit() }'
}

fetch_orig() {  # $1 = Debian version; prints path of verified tarball
  local ver=$1 dir sha size file dl=$WORK/dl
  read -r dir sha size file < <(src_entry "$ver") || true
  [ -n "${sha:-}" ] || return 1
  mkdir -p "$dl"
  if id _apt >/dev/null 2>&1; then chown _apt "$dl"; fi
  # apt's source machinery; --tar-only skips the .debian.tar.xz that may 404.
  (cd "$dl" && q apt-get -q "${APT_PRIV[@]}" source --download-only --tar-only "criu=$ver") || true
  if ! echo "$sha  $dl/$file" | sha256sum -c --status 2>/dev/null; then
    rm -f "$dl/$file"
    q /usr/lib/apt/apt-helper download-file "${MIRROR%/}/$dir/$file" "$dl/$file" "SHA256:$sha" || return 1
  fi
  echo "$sha  $dl/$file" | sha256sum -c --status || return 1
  echo "sha256 ok: $file $sha (size $size)" >>"$LOG"
  echo "$dl/$file"
}

build_criu() {  # $1 = Debian version; prints upstream version on success
  local dver=$1 tarball up src dest
  tarball=$(fetch_orig "$dver") || { say "criu $dver: source not available"; return 1; }
  up=${dver%-*}
  mkdir -p "$WORK/build"
  q tar -C "$WORK/build" -xf "$tarball" || return 1
  src=$(find "$WORK/build" -mindepth 1 -maxdepth 1 -type d | head -n1)
  # A patch that does not apply fails this version, like a failed build.
  local p
  for p in $(patches_of "$up"); do
    say "criu $up: applying ${p##*/}"
    q patch -p1 -N -d "$src" -i "$p" || { say "criu $up: ${p##*/} does not apply"; return 1; }
  done
  say "building criu $up (make criu)"
  # SOURCE_DATE_EPOCH pins KDAT_MAGIC_2, so rebuilds keep the kdat cache valid.
  q env SOURCE_DATE_EPOCH="$(stat -c %Y "$src/Makefile")" \
    make -C "$src" -j"$(nproc)" RUNDIR="$KDAT_DIR" criu || return 1
  dest=$CACHE_ROOT/$up
  mkdir -p "$dest" &&
    install -m 0755 "$src/criu/criu" "$dest/criu.new" &&
    mv -f "$dest/criu.new" "$dest/criu" || return 1
  printf 'debian_version=%s\nsha256=%s\nbuild_id=%s\nkdat_dir=%s\npatches=%s\n' \
    "$dver" "$(sha256sum "$tarball" | cut -d' ' -f1)" "$(build_id "$up")" "$KDAT_DIR" \
    "$(patches_of "$up" | xargs -r -n1 basename | paste -sd' ')" >"$dest/BUILDINFO"
  echo "$up"
}

# ---------------------------------------------------------------- 2. choose
# 1) a cached build with the current build id (flags + patches); 2) a fresh build;
# 3) only if that fails: an older cached build, then the system's criu.
CHOSEN='' SOURCE='' KDAT_OF_CHOSEN=''
if [ "$FORCE_BUILD" = 0 ]; then
  for d in $(ls -1 "$CACHE_ROOT" 2>/dev/null | sort -rV); do
    b=$CACHE_ROOT/$d/criu
    [ -x "$b" ] && grep -qxF "build_id=$(build_id "$d")" "$CACHE_ROOT/$d/BUILDINFO" 2>/dev/null || continue
    if criu_ok "$b"; then CHOSEN=$b SOURCE=cache KDAT_OF_CHOSEN=$KDAT_DIR; break; fi
  done
fi
if [ -z "$CHOSEN" ]; then
  say "no cached criu with the current build id and patches; building from Debian source"
  MIRROR=$(mirror_uri)
  up=
  if setup_private_apt; then
    for v in $SOURCE_VERSIONS; do
      if up=$(build_criu "$v"); then break; fi
      up=
    done
    if [ -z "${up:-}" ]; then
      # Named versions gone from the archive: newest criu >= 4.1 it has now.
      v=$(apt-cache "${APT_PRIV[@]}" showsrc criu 2>/dev/null | awk '/^Version:/ {print $2}' | sort -rV | head -n1)
      if [ -n "$v" ] && dpkg --compare-versions "$v" ge 4.1; then up=$(build_criu "$v") || up=; fi
    fi
  fi
  if [ -n "${up:-}" ] && criu_ok "$CACHE_ROOT/$up/criu"; then
    CHOSEN=$CACHE_ROOT/$up/criu SOURCE=built KDAT_OF_CHOSEN=$KDAT_DIR
  fi
fi
if [ -z "$CHOSEN" ]; then
  # Build failed (offline, archive changed, patch no longer applies): any cached
  # build that works, even one with other flags or patches, then the system's.
  for d in $(ls -1 "$CACHE_ROOT" 2>/dev/null | sort -rV); do
    b=$CACHE_ROOT/$d/criu
    [ -x "$b" ] && criu_ok "$b" || continue
    k=$(awk -F= '$1 == "kdat_dir" {print $2}' "$CACHE_ROOT/$d/BUILDINFO" 2>/dev/null || true)
    CHOSEN=$b SOURCE=cache-fallback KDAT_OF_CHOSEN=${k:-/run}
    echo "install-criu: build failed; using cached $b ($(grep -h '^build_id=' "$CACHE_ROOT/$d/BUILDINFO" 2>/dev/null))" >&2
    break
  done
fi
if [ -z "$CHOSEN" ] && [ -x /usr/sbin/criu ] && criu_ok /usr/sbin/criu; then
  CHOSEN=/usr/sbin/criu SOURCE=system KDAT_OF_CHOSEN=/run
  echo "install-criu: build failed; using the system's /usr/sbin/criu (unpatched)" >&2
fi
[ -n "$CHOSEN" ] || die "could not download/build CRIU (tried: $SOURCE_VERSIONS) and no cached or system criu passes 'criu check'"

# Stable path (atomic replace, no-op when already right).
mkdir -p "$PREFIX"
LINK=$PREFIX/criu
if [ "$(readlink "$LINK" 2>/dev/null || true)" != "$CHOSEN" ]; then
  ln -sfn "$CHOSEN" "$LINK.new"
  mv -Tf "$LINK.new" "$LINK"
fi

# ---------------------------------------------------------------- kdat tmpfs
# CRIU only keeps its kernel-feature cache (criu.kdat) if the file lives on
# tmpfs; otherwise every invocation re-probes the kernel.
is_tmpfs() { [ "$(stat -f -c %T "$1" 2>/dev/null)" = tmpfs ]; }
if [ "$KDAT_TMPFS" = auto ]; then
  if [ "$KDAT_OF_CHOSEN" = "$KDAT_DIR" ]; then KDAT_TMPFS=1; else KDAT_TMPFS=0; fi
fi
if [ "$KDAT_TMPFS" = 1 ] && [ "$KDAT_OF_CHOSEN" = /run ] && ! is_tmpfs /run; then
  say "not mounting tmpfs over /run (system criu); kdat cache stays off"
elif [ "$KDAT_TMPFS" = 1 ] && ! is_tmpfs "$KDAT_OF_CHOSEN"; then
  mkdir -p "$KDAT_OF_CHOSEN"
  q mount -t tmpfs -o size=1m,mode=0700,nosuid,nodev,noexec beam-criu-kdat "$KDAT_OF_CHOSEN" ||
    say "could not mount tmpfs on $KDAT_OF_CHOSEN; criu will re-probe each run"
fi

# ---------------------------------------------------------------- 3. verify
criu_ok "$LINK" || die "$LINK: 'criu check' failed"
VERSION=$(criu_ver "$LINK")
[ -n "$VERSION" ] || die "$LINK --version printed no version"

smoke_test() {
  local d=$WORK/smoke pid st f
  mkdir -p "$d"
  # Close every inherited fd >2 (our flock fd 9, CI's pipes/sockets): CRIU
  # refuses to dump a task holding a file lock.
  (
    for p in /proc/"$BASHPID"/fd/*; do
      p=${p##*/}; if [ "$p" -gt 2 ]; then eval "exec $p>&-"; fi
    done
    exec setsid sleep 1000 </dev/null >/dev/null 2>&1
  ) &
  SMOKE_PID=$!
  pid=$SMOKE_PID
  # wait until it has exec'd sleep as its own session leader
  for _ in $(seq 100); do
    st=$(cat "/proc/$pid/stat" 2>/dev/null) || break
    read -r -a f <<<"${st##*) }"            # state ppid pgrp session ...
    [[ $st == *"(sleep)"* ]] && [ "${f[3]}" = "$pid" ] && break
    sleep 0.05
  done
  q crun "$LINK" dump -t "$pid" -D "$d" -o dump.log || { cat "$d/dump.log" >>"$LOG" 2>/dev/null; return 1; }
  wait "$pid" 2>/dev/null || true          # dump killed it; reap so the PID is free
  q crun "$LINK" restore -D "$d" -d -o restore.log || { cat "$d/restore.log" >>"$LOG" 2>/dev/null; return 1; }
  st=$(cat "/proc/$pid/stat" 2>/dev/null) || { echo "pid $pid not back after restore" >>"$LOG"; return 1; }
  [[ $st == *"(sleep)"* ]] && [[ ${st##*) } != Z* ]] || { echo "pid $pid: $st" >>"$LOG"; return 1; }
  kill -KILL "$pid"
  for _ in $(seq 100); do
    st=$(cat "/proc/$pid/stat" 2>/dev/null) || break
    [[ ${st##*) } == Z* ]] && break
    sleep 0.05
  done
  SMOKE_PID=
}
smoke_test || die "dump/restore smoke test with $LINK failed"

trap - ERR
say "ok: source=$SOURCE kdat_dir=$KDAT_OF_CHOSEN ($(stat -f -c %T "$KDAT_OF_CHOSEN")) in ${SECONDS}s"
echo "criu_bin=$LINK criu_version=$VERSION"
