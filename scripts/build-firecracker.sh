#!/usr/bin/env bash
# Builds Firecracker, the peer `scripts/bench peers` measures runv against,
# from the source tarball in the shared peers directory (RUNV_PEERS_DIR,
# default ../shared/peers beside the checkout) into ~/.cache/runv/peers, and
# prints the binary's path. Cached: a built binary is reused.
#
# Built on the gnu target (no musl here), Firecracker has no default seccomp
# policy and runs without its filters: figures taken with it say so.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PATH="$HOME/.cargo/bin:$PATH"
version=1.16.1
peers=${RUNV_PEERS_DIR:-$repo/../shared/peers}
cache=${RUNV_PEERS_CACHE:-$HOME/.cache/runv/peers}
source_dir=$cache/firecracker-$version
binary=$source_dir/build/cargo_target/release/firecracker

log() { echo "build-firecracker: $*" >&2; }

if [[ -x $binary ]]; then
    echo "$binary"
    exit 0
fi
tarball=$peers/firecracker-$version.tar.gz
if [[ ! -f $tarball ]]; then
    log "$tarball not found: set RUNV_PEERS_DIR to the directory that holds it"
    exit 1
fi
# bindgen (for userfaultfd-sys) needs libclang.
if ! dpkg -s libclang-dev clang >/dev/null 2>&1; then
    log "installing libclang-dev and clang"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libclang-dev clang >&2
fi
mkdir -p "$cache"
rm -rf "$source_dir"
tar xzf "$tarball" -C "$cache"
log "building Firecracker $version (a few minutes; log: $cache/fc-build.log)"
if ! (cd "$source_dir" && cargo build --release -p firecracker --bin firecracker) >"$cache/fc-build.log" 2>&1; then
    tail -n 20 "$cache/fc-build.log" >&2
    log "the build failed (full log: $cache/fc-build.log)"
    exit 1
fi
echo "$binary"
