#!/bin/busybox sh
# PID 1 of the nested-KVM bed's L1 (scripts/nested-kvm.sh). It mounts the
# host's root (9p, read-only) under a tmpfs overlay, makes the mounts a node
# has (proc, sys, dev, cgroup v1 as on the host, a scratch disk, tmpfs on
# /run), chroots there and runs the job the host left in the `job` share:
# its output goes to job/output, its exit code to job/rc. Then it powers off.
# Directories listed in job/shares are the host's own, writable.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for module in $(cat /modules/order); do
    insmod "/modules/$module" || echo "l1: insmod $module failed"
done
ninep="trans=virtio,version=9p2000.L,msize=1048576"
mount -t 9p -o "$ninep,ro,cache=loose" hostroot /lower
mount -t tmpfs -o mode=755 tmpfs /upper
mkdir -p /upper/data /upper/work
mount -t overlay -o lowerdir=/lower,upperdir=/upper/data,workdir=/upper/work overlay /newroot

root=/newroot
# L1's kernel modules, unpacked on the host (`l1.modules=` names where).
modules=$(sed -n 's/.*l1\.modules=\([^ ]*\).*/\1/p' /proc/cmdline)
for fs in proc sys dev; do mount --move "/$fs" "$root/$fs"; done
mkdir -p "$root/dev/pts" "$root/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666 devpts "$root/dev/pts"
mount -t tmpfs -o mode=1777 tmpfs "$root/dev/shm"
# The scratch disk on /scratch (the job's TMPDIR), formatted afresh with the
# host's mkfs (busybox makes only ext2); /tmp stays the host's, under the
# overlay, as a checkout there must be seen. The disk shows up a moment
# after its driver loads.
for _ in $(seq 50); do [ -b "$root/dev/vda" ] && break; sleep 0.1; done
chroot "$root" /usr/sbin/mkfs.ext4 -q -F -E nodiscard /dev/vda || echo "l1: mkfs.ext4 of /dev/vda failed"
mkdir -p "$root/scratch"
mount -t ext4 "$root/dev/vda" "$root/scratch" || echo "l1: cannot mount the scratch disk"
chmod 1777 "$root/scratch"
mount -t tmpfs -o mode=755 tmpfs "$root/run"
mkdir -p "$root/run/l1-job" "$root/run/lock"
mount -t 9p -o "$ninep,cache=none" job "$root/run/l1-job"
# Host directories shared writable at their own paths (`run --share`), so
# that what the job writes there (reports) outlives L1.
n=0
while read -r dir; do
    mkdir -p "$root$dir"
    mount -t 9p -o "$ninep,cache=none" "share$n" "$root$dir" || echo "l1: cannot share $dir"
    n=$((n + 1))
done <"$root/run/l1-job/shares"
mkdir -p "$root/lib/modules"
mount --bind "$root$modules" "$root/lib/modules"
cgroups=$root/sys/fs/cgroup
mount -t tmpfs -o mode=755 cgroup "$cgroups"
for controller in cpu cpuacct cpuset memory devices freezer blkio pids net_cls perf_event hugetlb; do
    mkdir -p "$cgroups/$controller"
    mount -t cgroup -o "$controller" cgroup "$cgroups/$controller"
done
mkdir -p "$cgroups/systemd" "$cgroups/unified"
mount -t cgroup -o none,name=systemd cgroup "$cgroups/systemd"
mount -t cgroup2 cgroup2 "$cgroups/unified"

# The host's shell and tools from here on (busybox's shell would run its
# own applets, modprobe among them, in place of the host's).
exec chroot "$root" /bin/sh -c '
    export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    job=/run/l1-job
    hostname l1
    ip link set lo up
    for module in $(cat $job/modules); do
        modprobe "$module" || echo "l1: modprobe $module failed" >>$job/output
    done
    # /dev/kvm as the udev rules of Debian leave it: QEMU, unprivileged,
    # reaches KVM through the group.
    getent group kvm >/dev/null || groupadd --system kvm
    chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
    sh $job/job.sh >>$job/output 2>&1 </dev/null
    echo $? >$job/rc
    sync
    exec /bin/busybox poweroff -f
'
