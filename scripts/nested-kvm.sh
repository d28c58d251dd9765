#!/usr/bin/env bash
# The nested-KVM test bed: runs a command where runv's builtin hypervisor
# can boot the guest. On a host whose /dev/kvm has VT-x or AMD-V that is the
# host itself. Elsewhere (this project's build machines: /dev/kvm is PVM)
# it is a level-1 VM ("L1"): QEMU with TCG emulates AMD SVM with nested
# paging, Debian 12's stock kernel in it loads kvm_amd, and its /dev/kvm
# runs the real guest (L1 has 4-level paging: under 5-level, its kernel
# crashed in KVM). L1's root is this host's root file system, read-only
# over 9p under a tmpfs overlay, so every installed program, the guest
# images and test binaries built here are there; its TMPDIR is a scratch disk.
#
#   scripts/nested-kvm.sh prepare          fetch and build L1 (cached)
#   scripts/nested-kvm.sh run [options] -- COMMAND [ARGS...]
#       --cpus N       L1's vCPUs (default 2)
#       --memory MIB   L1's memory (default 6144)
#       --timeout S    kill L1 after S seconds (default 3600)
#       --always-l1    use L1 even where the host could run builtin itself
#       --share DIR    DIR (created if need be) is the host's own in L1,
#                      writable at the same path: what the command leaves
#                      there (reports) outlives L1; may be repeated
#   scripts/nested-kvm.sh check            say where builtin would run
#
# `run` executes COMMAND in the current directory with the caller's
# RUNV_*, RUST_*, CARGO_* and PATH variables, streams its output, and exits
# with its exit code (124 when L1 timed out, 125 when L1 failed to run it).
# Times in L1 are emulated: compare ratios from one run, and memory.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PATH="/usr/local/bin:$HOME/.cargo/bin:/usr/local/sbin:/usr/sbin:/sbin:$PATH"
cache=${RUNV_L1_CACHE:-$HOME/.cache/runv/l1}
# L1's kernel: Debian 12's stock kernel (the newest 6.1.0-N-amd64 in the
# archive), whose kvm_amd runs under QEMU's emulated SVM. QEMU 10
# (bookworm-backports) runs it: with QEMU 7.2's TCG, L1 sometimes locks up
# when its VM count goes to or from zero.
qemu_release=bookworm-backports
# Bump when what `prepare` fetches changes.
recipe=1

log() { echo "nested-kvm: $*" >&2; }
die() {
    log "$*"
    exit 125
}

# Modules L1's initramfs loads to reach its root (9p over virtio-pci), lay
# the overlay on it, and mount its scratch disk (ext4 on virtio-blk); the
# rest load from the root's /lib/modules.
boot_modules=(virtio_pci 9pnet_virtio 9p overlay virtio_blk ext4)
# Modules the tests need in L1: KVM, containerd's overlay snapshotter, CNI
# bridges and veths, taps with tc mirred, macvtap, loop devices for block
# volumes, and iptables for CNI's masquerading and port mappings.
l1_modules=(
    kvm_amd tun vhost_net vhost_vsock bridge br_netfilter veth macvtap loop
    sch_ingress cls_u32 cls_matchall act_mirred
    nf_tables nft_compat nft_chain_nat nft_ct xt_MASQUERADE xt_conntrack xt_comment
    xt_addrtype xt_mark xt_multiport iptable_nat iptable_filter ip6table_filter
)

host_runs_builtin() {
    # runv-ctl says whether the host's /dev/kvm boots the guest (a PVM
    # /dev/kvm does not, and neither does a missing one).
    command -v runv-ctl >/dev/null || die "runv-ctl not found: run scripts/install.sh"
    # The whole report first: grep -q leaving a pipe early would fail
    # runv-ctl with SIGPIPE, which pipefail would take for the answer.
    local report
    report=$(runv-ctl check 2>&1 || true)
    grep -q '^builtin: ' <<<"$report" || die "runv-ctl check says nothing of builtin: $report"
    ! grep -q '^builtin: *not usable' <<<"$report"
}

# apt with a private source list and package lists, so the host's apt
# configuration stays as it is.
apt_private() {
    local command=$1
    shift
    local lists=$cache/apt/lists
    local sources=$cache/apt/sources.list
    mkdir -p "$lists/partial" "$cache/apt/debs"
    {
        echo "deb http://deb.debian.org/debian bookworm main"
        echo "deb http://deb.debian.org/debian-security bookworm-security main"
        echo "deb http://deb.debian.org/debian $qemu_release main"
    } >"$sources"
    local options=(-q -o "Dir::Etc::SourceList=$sources" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$lists" -o APT::Sandbox::User=root)
    if [[ $command == update ]]; then
        apt-get "${options[@]}" update >&2
    elif [[ $command == download ]]; then
        (cd "$cache/apt/debs" && apt-get "${options[@]}" download "$@" >&2)
    else
        apt-cache "${options[@]}" "$command" "$@"
    fi
}

# Sets l1_kernel_release and l1 (the bed's directory): an L1 built
# before, else the newest Debian 12 kernel in the archive.
choose_l1() {
    local ready
    ready=$(ls -d "$cache"/*-r"$recipe"/ready 2>/dev/null | sort -V | tail -n 1 || true)
    if [[ -n $ready ]]; then
        l1=$(dirname "$ready")
    else
        apt_private update
        local package
        package=$(apt_private search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' |
            awk '{ print $1 }' | sort -V | tail -n 1)
        [[ -n $package ]] || die "no linux-image-6.1.0-*-amd64 in Debian's archive: is deb.debian.org reachable?"
        l1=$cache/${package#linux-image-}-r$recipe
    fi
    l1_kernel_release=$(basename "$l1")
    l1_kernel_release=${l1_kernel_release%-r"$recipe"}
}

prepare() {
    choose_l1
    [[ -f $l1/ready ]] || fetch_l1
    # The initramfs is quick to make: remade whenever what goes in changes.
    [[ $(initramfs_inputs) == "$(cat "$l1/initramfs.inputs" 2>/dev/null)" ]] || build_l1_initramfs
}

# L1's kernel with its modules, and QEMU 10, unpacked into $l1/root.
fetch_l1() {
    for tool in apt-get dpkg-deb depmod modprobe cpio gzip; do
        command -v "$tool" >/dev/null || die "$tool not found: run scripts/install.sh"
    done
    [[ -x /bin/busybox ]] || die "/bin/busybox not found: apt-get install busybox-static"
    log "building L1 in $l1 (Linux $l1_kernel_release, QEMU from $qemu_release)"
    rm -rf "$l1" && mkdir -p "$l1"
    apt_private download "linux-image-$l1_kernel_release" \
        "qemu-system-x86/$qemu_release" "qemu-system-data/$qemu_release"
    local deb
    for deb in "$cache"/apt/debs/{linux-image-"$l1_kernel_release"_,qemu-system-x86_,qemu-system-data_}*.deb; do
        dpkg-deb -x "$deb" "$l1/root"
    done
    depmod -b "$l1/root" "$l1_kernel_release"
    local qemu=$l1/root/usr/bin/qemu-system-x86_64
    ! ldd "$qemu" | grep 'not found' ||
        die "QEMU from $qemu_release needs the libraries above, which this host lacks"
    touch "$l1/ready"
}

initramfs_inputs() {
    echo "${boot_modules[*]}"
    cat "$repo/scripts/nested-kvm-init.sh"
}

# busybox, the boot modules in the order insmod takes them, and the init.
build_l1_initramfs() {
    local stage=$l1/initramfs
    rm -rf "$stage"
    mkdir -p "$stage"/{bin,dev,proc,sys,newroot,lower,upper,modules}
    cp /bin/busybox "$stage/bin/busybox"
    local module
    modprobe -d "$l1/root" -S "$l1_kernel_release" --show-depends -a "${boot_modules[@]}" |
        awk '$1 == "insmod" && !seen[$2]++ { print $2 }' |
        while read -r module; do
            cp "$module" "$stage/modules/"
            basename "$module" >>"$stage/modules/order"
        done
    cp "$repo/scripts/nested-kvm-init.sh" "$stage/init"
    chmod 755 "$stage/init"
    (cd "$stage" && find . | cpio --quiet -o -H newc | gzip -1 >"$l1/initramfs.cpio.gz")
    rm -rf "$stage"
    initramfs_inputs >"$l1/initramfs.inputs"
    log "L1 ready: $l1"
}

run_in_l1() {
    local cpus=$1 memory=$2 timeout=$3
    shift 3
    prepare
    local share share_args=() n=0
    job=$(mktemp -d /tmp/runv-l1.XXXXXX)
    trap 'rm -rf "$job"' EXIT
    {
        echo "cd $(printf %q "$PWD")"
        local name
        while read -r name; do
            echo "export $name=$(printf %q "${!name}")"
        done < <(compgen -e | grep -E '^(RUNV_|RUST_|CARGO_|PATH$|HOME$|TERM$)')
        # Temporary files on L1's scratch disk.
        echo "export TMPDIR=/scratch"
        printf 'exec'
        printf ' %q' "$@"
        echo
    } >"$job/job.sh"
    echo "${l1_modules[*]}" >"$job/modules"
    : >"$job/shares"
    for share in "${shares[@]}"; do
        echo "$share" >>"$job/shares"
        share_args+=(-virtfs "local,path=$share,mount_tag=share$n,security_model=none")
        n=$((n + 1))
    done
    # L1's scratch disk (its TMPDIR): sparse, so tests meet a disk file
    # system (O_DIRECT, overlayfs, as on a node) and their files cost host
    # disk, not L1 RAM.
    truncate -s 64G "$job/scratch.img"
    : >"$job/output"
    tail -n +1 -F "$job/output" 2>/dev/null &
    local tail=$!
    local qemu=$l1/root/usr/bin/qemu-system-x86_64
    local status=0
    # mitigations=off: L1 is a test machine, and its kernel's speculation
    # barriers only slow the emulation down. oops=panic: an oops in L1's
    # kernel (the emulation's fault, docs/testing.md) ends L1 at once
    # instead of leaving the command waiting on a dead task until timeout.
    timeout --kill-after=10 "$timeout" "$qemu" -L "$l1/root/usr/share/qemu" \
        -accel tcg,thread=multi -cpu max,la57=off -smp "$cpus" -m "$memory" \
        -nodefaults -display none -serial "file:$job/console.log" -no-reboot \
        -kernel "$l1/root/boot/vmlinuz-$l1_kernel_release" -initrd "$l1/initramfs.cpio.gz" \
        -append "console=ttyS0 loglevel=4 panic=-1 oops=panic mitigations=off l1.modules=$l1/root/lib/modules" \
        -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on \
        -virtfs "local,path=$job,mount_tag=job,security_model=none" "${share_args[@]}" \
        -drive "file=$job/scratch.img,format=raw,if=virtio,cache=unsafe,discard=unmap" || status=$?
    sleep 0.5
    kill "$tail" 2>/dev/null || true
    wait "$tail" 2>/dev/null || true
    if [[ -f $job/rc ]]; then
        return "$(cat "$job/rc")"
    fi
    if ((status == 124 || status == 137)); then
        log "L1 timed out after ${timeout}s; its console's last lines:"
        tail -n 30 "$job/console.log" >&2
        return 124
    fi
    log "L1 ended (QEMU status $status) without running the command to its end; console:"
    tail -n 40 "$job/console.log" >&2
    return 125
}

cmd=${1:-}
shift || true
case $cmd in
prepare)
    prepare
    echo "$l1"
    ;;
check)
    if host_runs_builtin; then
        echo "builtin runs on this host's /dev/kvm"
    else
        echo "builtin runs in L1 (QEMU TCG with emulated AMD SVM): this host's /dev/kvm cannot boot the guest"
    fi
    ;;
run)
    cpus=2 memory=6144 timeout=3600 always_l1= shares=()
    while (($#)); do
        case $1 in
        --cpus) cpus=$2 && shift 2 ;;
        --memory) memory=$2 && shift 2 ;;
        --timeout) timeout=$2 && shift 2 ;;
        --always-l1) always_l1=1 && shift ;;
        --share)
            mkdir -p "$2"
            shares+=("$(cd "$2" && pwd)") && shift 2
            ;;
        --) shift && break ;;
        *) die "unknown option $1 (see the head of $0)" ;;
        esac
    done
    (($#)) || die "no command given: scripts/nested-kvm.sh run -- COMMAND"
    if [[ -z $always_l1 ]] && host_runs_builtin; then
        exec "$@"
    fi
    status=0
    run_in_l1 "$cpus" "$memory" "$timeout" "$@" || status=$?
    exit "$status"
    ;;
*)
    sed -n '2,/^set -euo/p' "$0" | sed -e '$d' >&2
    exit 2
    ;;
esac
