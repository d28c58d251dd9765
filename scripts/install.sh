#!/usr/bin/env bash
# Installs everything runv needs on a Debian 12 node, from this checkout:
# Debian packages, vhost-device-vsock, virtiofsd, the guest kernel and
# initramfs, the runv binaries and the default configuration. Idempotent: a
# second run only redoes what changed (the kernel build is cached in
# ~/.cache/runv).
#
#   scripts/install.sh        (as root)
#
# RUNV_PREFIX (default /usr/local) moves the binaries and guest images.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# rustup's cargo and the helpers installed under /usr/local, whatever PATH
# the caller had (CI runs with a bare environment).
export PATH="/usr/local/bin:$HOME/.cargo/bin:$PATH"
prefix=${RUNV_PREFIX:-/usr/local}
share=$prefix/share/runv
config=/etc/runv/runv.toml
vhost_vsock_version=0.3.0
virtiofsd_version=1.14.0

log() { echo "install: $*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
    log "run me as root: I install Debian packages and write to $prefix and /etc/runv"
    exit 1
fi

# Debian packages: QEMU (the qemu hypervisor), the kernel source and its
# build tools, cpio for the initramfs, busybox for test images, containerd
# and runc for the shim and its tests, the CNI plugins for pod networks,
# protoc for the tests' CRI client (k8s-cri), the libraries virtiofsd links
# (capabilities, seccomp), fio for the storage benchmark, iperf3 and ping
# for the network benchmark; kmod, iproute2 and e2fsprogs for the nested-KVM
# test bed (scripts/nested-kvm.sh); iptables, which the service-mesh test
# copies into its init container's image.
packages=(
    qemu-system-x86 linux-source-6.12 build-essential flex bison bc libelf-dev
    libssl-dev cpio xz-utils busybox-static binutils pkg-config libcap-ng-dev
    libseccomp-dev containerd runc containernetworking-plugins protobuf-compiler fio iperf3
    iputils-ping python3-matplotlib kmod iproute2 e2fsprogs iptables
)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

# vhost-device-vsock: the guest vsock for QEMU, with the hybrid Unix socket.
if ! "$prefix/bin/vhost-device-vsock" --version 2>/dev/null | grep -q "$vhost_vsock_version"; then
    log "installing vhost-device-vsock $vhost_vsock_version"
    cargo install --quiet --locked --root "$prefix" "vhost-device-vsock@$vhost_vsock_version"
fi

# virtiofsd: the virtio-fs backend that shares container root file systems
# with the guest on the qemu hypervisor.
if ! "$prefix/bin/virtiofsd" --version 2>/dev/null | grep -qx "virtiofsd $virtiofsd_version"; then
    log "installing virtiofsd $virtiofsd_version"
    cargo install --quiet --locked --root "$prefix" "virtiofsd@$virtiofsd_version"
fi

# Guest kernel (cached outside the repo), initramfs and builtin's root
# image (built beside the initramfs).
kernel=$("$repo/scripts/build-kernel.sh")
initramfs=$("$repo/scripts/build-initramfs.sh")
install -D -m 0644 "$kernel" "$share/vmlinux"
install -D -m 0644 "$initramfs" "$share/runv-initramfs.cpio.gz"
install -D -m 0644 "$(dirname "$initramfs")/runv-root.img" "$share/runv-root.img"
log "guest kernel, initramfs and root image in $share"

# Host binaries.
log "building the runv binaries"
cargo build --manifest-path "$repo/Cargo.toml" --locked --release -p runv-ctl -p runv-shim >&2
install -D -m 0755 "$repo/target/release/runv-ctl" "$prefix/bin/runv-ctl"
log "installed $prefix/bin/runv-ctl"
# containerd finds a shim by its runtime type on PATH:
# `ctr run --runtime io.containerd.runv.v2` runs containerd-shim-runv-v2.
install -D -m 0755 "$repo/target/release/containerd-shim-runv-v2" "$prefix/bin/containerd-shim-runv-v2"
log "installed $prefix/bin/containerd-shim-runv-v2 (containerd CRI snippet: configs/containerd/runv.toml)"

# Default configuration, pointing at the images above, with the hypervisor
# this host can run: builtin where its KVM boots the guest, else qemu. An
# existing file is the operator's and is left alone.
if [[ ! -e $config ]]; then
    install -d /etc/runv
    hypervisor=$("$prefix/bin/runv-ctl" --config "$repo/configs/runv.toml" pick-hypervisor)
    # Without usable KVM, qemu runs the guest with TCG, which needs the
    # explicit switch (TCG is not a security boundary; runv-ctl check says so).
    allow_tcg=false
    kvm=$("$prefix/bin/runv-ctl" --config "$repo/configs/runv.toml" check | grep '^kvm:' || true)
    if [[ $hypervisor == qemu && ! $kvm =~ ^kvm:\ *usable ]]; then
        allow_tcg=true
    fi
    sed -e "s#/usr/local/share/runv#$share#" \
        -e "s#^hypervisor = .*#hypervisor = \"$hypervisor\"#" \
        -e "s#^allow_tcg = .*#allow_tcg = $allow_tcg#" \
        "$repo/configs/runv.toml" >"$config"
    log "wrote $config (hypervisor = \"$hypervisor\", allow_tcg = $allow_tcg)"
else
    log "kept the existing $config"
fi
