#!/usr/bin/env bash
# build-image.sh — build the OCI images: beam-worker (worker + CRIU + Python + SDK) and
# beam-example-ml (examples/ml layered on top, the pattern for a user app).
#
#   scripts/build-image.sh [--no-example] [--rebuild-base] [-h]
#
# No registry base image can be pulled on these machines, so the base root filesystem is
# made with debootstrap from the Debian mirror this machine's apt already uses, and
# imported as beam-base:<key>. <key> hashes the package lists, the mirror and the recipe
# (make_rootfs below), so a warm run reuses the cached image, or the cached rootfs tarball
# under $BEAM_IMAGE_CACHE when podman's storage was wiped. The project is then built inside
# `podman build` from its source, offline: every build dependency is already in the base.
#
# CRIU: the container gets the CRIU 4.2.1 binary that scripts/install-criu.sh built for this
# host (Debian bookworm's criu 3.17 cannot run on kernels >= 6.13). It links only bookworm
# libraries that the base image also has; the build checks with ldd that all resolve.
#
# Environment:
#   BEAM_IMAGE_CACHE      rootfs cache (default /var/cache/beam/image)
#   BEAM_IMAGE_TAG        tag of the images built (default: latest)
#   BEAM_IMAGE_EXTRA_PKGS Debian packages added to the base for apps (default: the
#                         scientific stack examples/ml imports); part of the cache key
#
# Last line of stdout: `image=beam-worker:TAG example=beam-example-ml:TAG base=beam-base:KEY
# build_s=N base_from=cached|imported|debootstrapped`. Measured: docs/deploy.md.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${BEAM_IMAGE_CACHE:-/var/cache/beam/image}
tag=${BEAM_IMAGE_TAG:-latest}
example=1
rebuild_base=0
while [ $# -gt 0 ]; do
  case "$1" in
    --no-example) example=0 ;;
    --rebuild-base) rebuild_base=1 ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "build-image: unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
[ "$(id -u)" = 0 ] || { echo "build-image: must run as root (podman rootful, debootstrap)" >&2; exit 1; }
for t in podman runc debootstrap; do
  command -v "$t" >/dev/null || { echo "build-image: $t missing; run scripts/install-deps.sh" >&2; exit 1; }
done
start=$(date +%s)
say() { echo "build-image: $*" >&2; }

# What the worker and CRIU need at run time, plus what building beam from source needs
# (the build runs inside `podman build`, where the network may not work: every package is
# installed here, by debootstrap). `criu` is bookworm's: we use its libcriu.so, criu.h and
# criu.pc (libcriu talks RPC to the newer criu binary), and it pulls the libraries the CRIU
# 4.2.1 binary links (libnftables1, libnl-3-200, libnet1, libprotobuf-c1, ...).
BASE_PKGS=(python3 python3-venv python3-dev python3-pip python3-setuptools python3-wheel
  python3-msgpack build-essential cmake pkg-config libuv1-dev libmsgpack-dev
  libhttp-parser-dev libxxhash-dev libarchive-dev libzstd-dev libprotobuf-c-dev criu
  libbsd0 libgnutls30 libnftables1 libprotobuf-c1 libnl-3-200 libnet1 libuuid1
  libcap2-bin procps ca-certificates)
# Apps' Debian-packaged dependencies. A user app with PyPI dependencies instead adds
# `RUN pip install -r requirements.txt` in its own stage (needs network at build time).
read -r -a EXTRA_PKGS <<<"${BEAM_IMAGE_EXTRA_PKGS-python3-numpy python3-scipy python3-sklearn python3-pandas}"

# The Debian mirror this machine's apt already uses (never a hard-coded host).
mirror=$(apt-get indextargets --no-release-info --format '$(REPO_URI) $(RELEASE)' 2>/dev/null |
  awk '$2 == "bookworm" {print $1; exit}')
[ -n "$mirror" ] || { echo "build-image: no bookworm entry in this machine's apt sources" >&2; exit 1; }

# make_rootfs DIR: the base root filesystem. Its own text is part of the cache key (with the
# package lists and the mirror), so changing how the base is made rebuilds it, while
# editing the rest of this script does not.
make_rootfs() {
  local root=$1 pkgs
  pkgs=$(IFS=,; echo "${BASE_PKGS[*]}${EXTRA_PKGS[*]:+,${EXTRA_PKGS[*]}}")
  debootstrap --variant=minbase --include="$pkgs" bookworm "$root" "$mirror"
  # Leave the image's apt pointing at the same mirror; drop the downloaded .debs.
  echo "deb $mirror bookworm main" >"$root/etc/apt/sources.list"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
}
key=$( { printf '%s\n' "${BASE_PKGS[@]}" -- "${EXTRA_PKGS[@]}" -- "$mirror"; declare -f make_rootfs; } |
  sha256sum | cut -c1-16)
base=beam-base:$key
tarball=$cache/rootfs-$key.tar
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock -w 900 9 || { echo "build-image: could not lock $cache/.lock" >&2; exit 1; }

base_how=cached
if [ "$rebuild_base" = 1 ]; then podman rmi -f "$base" >/dev/null 2>&1 || true; rm -f "$tarball"; fi
if ! podman image exists "$base"; then
  if ! [ -s "$tarball" ]; then
    base_how=debootstrapped
    root=$cache/rootfs-$key.tmp
    rm -rf "$root"
    say "debootstrap bookworm from $mirror (${#BASE_PKGS[@]}+${#EXTRA_PKGS[@]} packages; a few minutes)"
    make_rootfs "$root" >"$cache/debootstrap-$key.log" 2>&1 ||
      { tail -n 30 "$cache/debootstrap-$key.log" >&2; echo "build-image: debootstrap failed" >&2; exit 1; }
    tar -C "$root" -cf "$tarball.tmp" . && mv -f "$tarball.tmp" "$tarball"
    rm -rf "$root"
    # Only the current key's rootfs is worth its GiB of disk.
    find "$cache" -maxdepth 1 \( -name 'rootfs-*.tar' -o -name 'debootstrap-*.log' \) \
      ! -name "rootfs-$key.tar" ! -name "debootstrap-$key.log" -delete
  else
    base_how=imported
  fi
  say "podman import $base"
  podman import -q "$tarball" "$base" >/dev/null
  # Older bases (other keys) only take disk; one still under a built image stays.
  podman images --format '{{.Repository}}:{{.Tag}}' | grep '^localhost/beam-base:' |
    grep -v ":$key\$" | xargs -r podman rmi >/dev/null 2>&1 || true
fi

# CRIU for the image: the binary install-criu.sh built (cached) for this host.
criu_line=$("$repo/scripts/install-criu.sh" | tail -n 1)
criu_bin=$(readlink -f "$(sed -n 's/^criu_bin=\([^ ]*\).*/\1/p' <<<"$criu_line")")
[ -x "$criu_bin" ] || { echo "build-image: install-criu.sh gave no binary ($criu_line)" >&2; exit 1; }

# Build context: what building beam and the examples reads, as git sees it (tracked +
# untracked-not-ignored; never .venv or build/, whose binaries embed this host's paths),
# plus the CRIU binary. Only these paths: editing docs or scripts keeps podman's cached
# layers (a warm build in seconds, not a rebuild of beam). tests/c and bench: CMakeLists.txt
# names their sources at configure time.
SRC_PATHS=(python csrc cmake setup.py pyproject.toml CMakeLists.txt MANIFEST.in tests/c bench
  examples)
ctx=$repo/build/image-context
rm -rf "$ctx"
mkdir -p "$ctx/src"
(cd "$repo" && git ls-files -co --exclude-standard -z -- "${SRC_PATHS[@]}" |
  xargs -0 tar -cf - --no-recursion) | tar -C "$ctx/src" -xf -
install -m 0755 "$criu_bin" "$ctx/criu"
cp "$(dirname "$criu_bin")/BUILDINFO" "$ctx/criu.BUILDINFO" 2>/dev/null || : >"$ctx/criu.BUILDINFO"

# runc: crun refuses this machine's cgroups; explicit rlimits: the defaults are refused.
common=(--runtime runc --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 --network host
  --build-arg "BASE=$base" -f "$repo/Containerfile")
say "podman build beam-worker:$tag"
podman build "${common[@]}" --target beam-worker -t "beam-worker:$tag" "$ctx" >"$cache/build-worker.log" 2>&1 ||
  { tail -n 40 "$cache/build-worker.log" >&2; echo "build-image: podman build beam-worker failed" >&2; exit 1; }
out="image=beam-worker:$tag"
if [ "$example" = 1 ]; then
  say "podman build beam-example-ml:$tag"
  podman build "${common[@]}" --target beam-example-ml -t "beam-example-ml:$tag" "$ctx" \
    >"$cache/build-example.log" 2>&1 ||
    { tail -n 40 "$cache/build-example.log" >&2; echo "build-image: podman build beam-example-ml failed" >&2; exit 1; }
  out="$out example=beam-example-ml:$tag"
fi
# The previous builds' layers, untagged by this one.
podman image prune -f >/dev/null 2>&1 || true
echo "$out base=$base build_s=$(( $(date +%s) - start )) base_from=$base_how"
