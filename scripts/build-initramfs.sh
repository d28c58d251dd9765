#!/usr/bin/env bash
# Builds runv-agent as a static binary and packs it as /init into a
# gzip-compressed cpio initramfs, and into an ext4 image, runv-root.img
# beside it: the builtin hypervisor's root image ([builtin] root_image),
# which the guest mounts read-only from virtio-pmem with DAX.
#
#   scripts/build-initramfs.sh [OUTPUT]   (default: target/runv/runv-initramfs.cpio.gz)
#
# Progress goes to stderr; the last line on stdout is the initramfs path.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-$repo/target/runv/runv-initramfs.cpio.gz}
# The gnu target with a static C runtime: there is no musl std on the
# build machines. With --target, RUSTFLAGS reach only the agent's own
# artefacts, not build scripts or the host crates.
target=x86_64-unknown-linux-gnu
max_bytes=$((4 * 1024 * 1024))

for tool in cargo cpio gzip mkfs.ext4; do
    command -v "$tool" >/dev/null || {
        echo "build-initramfs: $tool not found: run scripts/install.sh" >&2
        exit 1
    }
done

echo "build-initramfs: building runv-agent (static, profile guest)" >&2
# libseccomp (the OCI runtime's seccomp filters) from Debian's
# libseccomp-dev archive; its crate would link the shared library.
RUSTFLAGS="-C target-feature=+crt-static" \
    LIBSECCOMP_LINK_TYPE=static LIBSECCOMP_LIB_PATH=/usr/lib/x86_64-linux-gnu \
    cargo build --manifest-path "$repo/Cargo.toml" --locked --profile guest \
    -p runv-agent --target "$target" >&2
agent=$repo/target/$target/guest/runv-agent
# A dynamic executable names its loader in a PT_INTERP header; a static PIE
# that still needs a shared library would crash as /init.
if readelf -l "$agent" | grep -q INTERP || readelf -d "$agent" | grep -q NEEDED; then
    echo "build-initramfs: $agent is dynamically linked; it must be static" >&2
    exit 1
fi

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{proc,sys,dev,run,tmp}
install -m 0755 "$agent" "$stage/init"
mkdir -p "$(dirname "$out")"
(cd "$stage" && find . -print0 | LC_ALL=C sort -z |
    cpio --null --quiet -o -H newc --reproducible -R 0:0) | gzip -9 -n >"$out.tmp"
mv "$out.tmp" "$out"
# The same tree as ext4 for DAX: 4 KiB blocks (DAX maps whole pages), no
# journal (read-only), a size in whole 2 MiB units (the pmem device's).
image=$(dirname "$out")/runv-root.img
image_mib=$(( ($(du -sm "$stage" | cut -f1) + 2) / 2 * 2 + 2 ))
rm -f "$image.tmp"
mkfs.ext4 -q -F -b 4096 -m 0 -O ^has_journal,^resize_inode -N 64 -L runv-root \
    -E root_owner=0:0 -d "$stage" "$image.tmp" "${image_mib}M" >&2
mv "$image.tmp" "$image"
echo "build-initramfs: $image: $image_mib MiB" >&2

size=$(stat -c %s "$out")
echo "build-initramfs: $out: $((size / 1024)) KiB (agent $(($(stat -c %s "$agent") / 1024)) KiB uncompressed)" >&2
if ((size > max_bytes)); then
    echo "build-initramfs: the initramfs exceeds its 4 MiB budget" >&2
    exit 1
fi
echo "$out"
