//! Block devices plugged into a running pod VM (QEMU; TCG where KVM cannot
//! run the guest) and unplugged again: an ext4 image file read-write and a
//! loop device read-only, mounted through the agent; a busybox container
//! (the agent has no "exec on the VM") reads the host's file on both,
//! writes on one and is refused on the other. After unmount and unplug the
//! host finds the guest's write in the image, QEMU holds no descriptor of
//! either, and the guest has no block device left. QEMU opens volumes
//! with O_DIRECT, buffered where the file system refuses it (ramfs); read-
//! only ones read-only. Slots are reused, each plug shows the new device's
//! size, and one plug more than there are slots says why it cannot be.
//! Needs root (loop devices, a ramfs mount).

use std::{fs, path::PathBuf};

use runv_agent_client::ConnectOptions;
use runv_config::HypervisorKind;
use runv_sandbox::{BlockDevice, PodVm, SandboxError};
use runv_tests::{
    assert_nothing_left, boot_from_initramfs,
    busybox::{bind_mount, initramfs_with_busybox_rootfs, run_container},
    disks::{self, ext4_image, read_ext4_file, LoopDevice},
    test_config,
};

/// Where the agent mounts the disks in the guest.
const GUEST_RW: &str = "/run/runv/disks/rw";
const GUEST_RO: &str = "/run/runv/disks/ro";
const HOST_FILE: &str = "hello from the host\n";
const GUEST_FILE: &str = "written by the guest\n";

/// A ramfs mounted on a directory, unmounted when dropped.
struct Ramfs(PathBuf);

impl Ramfs {
    fn mount(dir: &std::path::Path) -> Ramfs {
        fs::create_dir(dir).unwrap();
        nix::mount::mount(
            Some("ramfs"),
            dir,
            Some("ramfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .expect("mounting a ramfs");
        Ramfs(dir.to_owned())
    }
}

impl Drop for Ramfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// What `pid`'s file descriptors point at.
fn open_files(pid: u32) -> Vec<PathBuf> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("reading QEMU's descriptors")
        .flatten()
        .filter_map(|fd| fs::read_link(fd.path()).ok())
        .collect()
}

/// The open flags of `pid`'s descriptors of `path`, and whether they are
/// read-only and O_DIRECT, from /proc/<pid>/fdinfo.
fn open_modes(pid: u32, path: &std::path::Path) -> Vec<(bool, bool)> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("reading QEMU's descriptors")
        .flatten()
        .filter(|fd| fs::read_link(fd.path()).is_ok_and(|target| target == path))
        .filter_map(|fd| {
            let info =
                fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.file_name().to_str()?))
                    .ok()?;
            let flags = info.lines().find_map(|l| l.strip_prefix("flags:"))?.trim();
            let flags = u32::from_str_radix(flags, 8).ok()?;
            let read_only = flags & libc::O_ACCMODE as u32 == libc::O_RDONLY as u32;
            Some((read_only, flags & libc::O_DIRECT as u32 != 0))
        })
        .collect()
}

/// The guest block devices a container sees in /sys/block, but the
/// virtual ones (loop, ram).
const LIST_DISKS: &str = "ls /sys/block | grep -v -e '^loop' -e '^ram' | tr '\\n' ' '";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_devices_are_plugged_mounted_and_unplugged() {
    if let Some(why) = disks::unavailable() {
        println!("SKIPPED: {why}");
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let content = scratch.path().join("content");
    fs::create_dir(&content).unwrap();
    fs::write(content.join("file"), HOST_FILE).unwrap();
    let rw_image = scratch.path().join("rw.img");
    ext4_image(&rw_image, 64, Some(&content));
    let loop_image = scratch.path().join("loop.img");
    ext4_image(&loop_image, 64, Some(&content));
    // Detached when dropped, whatever happens to the test.
    let loop_device = LoopDevice::attach(&loop_image);
    let loop_path = loop_device.path().to_owned();
    println!("loop device {}", loop_path.display());

    let mut config = test_config(scratch.path());
    let initramfs = initramfs_with_busybox_rootfs(scratch.path(), &config.vm.initramfs);
    boot_from_initramfs(&mut config, initramfs);
    let console = scratch.path().join("console.log");
    let spec = PodVm::spec(&config, "disks", console.clone());
    let connect = ConnectOptions::new(config.vm.agent_timeout());
    let vm = PodVm::boot(&config, spec, &connect)
        .await
        .expect("VM boots");
    let pids = vm.pids();
    // What holds the VM's disks: QEMU, or this process, whose threads are
    // the builtin VMM.
    let holder = pids.first().copied().unwrap_or_else(std::process::id);
    let agent = vm.agent();
    let socket = vm.vsock_socket();

    // The guest has no disk until one is plugged: the boot-time
    // placeholders of the slots are gone.
    let listed = run_container(agent, &socket, "before", &["sh", "-c", LIST_DISKS], vec![]).await;
    assert_eq!(listed.exit_status, 0, "{listed:?}");
    assert_eq!(listed.stdout, "", "no disk at first: {listed:?}");

    let rw = vm
        .plug_block(&BlockDevice {
            path: rw_image.clone(),
            read_only: false,
        })
        .await
        .expect("plugging the image");
    let ro = vm
        .plug_block(&BlockDevice {
            path: loop_path.clone(),
            read_only: true,
        })
        .await
        .expect("plugging the loop device");
    println!("plugged: {rw:?} (image, read-write), {ro:?} (loop device, read-only)");
    let first_slots = match config.hypervisor {
        // microvm's standby slots: read-write ones from 2, read-only from 6.
        HypervisorKind::Qemu => (2, 6),
        // Any free slot, in order, after the vsock's and the balloon's.
        HypervisorKind::Builtin => (2, 3),
    };
    assert_eq!(
        (rw.slot, ro.slot),
        first_slots,
        "first read-write and read-only slots"
    );
    assert!(rw.guest_device.starts_with("/dev/vd"), "{rw:?}");
    assert!(ro.guest_device.starts_with("/dev/vd"), "{ro:?}");
    let held = open_files(holder);
    assert!(held.contains(&rw_image), "the VM holds the image: {held:?}");
    assert!(held.contains(&loop_path), "the VM holds the loop: {held:?}");
    // QEMU opens disks with O_DIRECT; the builtin VMM's virtio-blk does
    // buffered I/O (guest buffers need not be aligned as O_DIRECT wants).
    // The read-only device is open only for reading.
    let direct = config.hypervisor == HypervisorKind::Qemu;
    assert_eq!(open_modes(holder, &rw_image), [(false, direct)]);
    assert_eq!(open_modes(holder, &loop_path), [(true, direct)]);

    agent
        .mount(&rw.guest_device, "ext4", &[], GUEST_RW)
        .await
        .expect("mounting the read-write disk");
    let refused = agent
        .mount(&ro.guest_device, "ext4", &[], GUEST_RO)
        .await
        .expect_err("a read-only disk cannot be mounted writable");
    println!("writable mount of the read-only disk refused: {refused}");
    agent
        .mount(&ro.guest_device, "ext4", &["ro".into()], GUEST_RO)
        .await
        .expect("mounting the read-only disk read-only");

    let name = |device: &str| device.trim_start_matches("/dev/").to_owned();
    let script = format!(
        "cat /rw/file /ro/file && printf '{GUEST_FILE}' > /rw/from-guest && sync && \
         if echo x > /ro/x; then echo 'ro: written'; else echo 'ro: refused'; fi; \
         cat /sys/block/{}/ro /sys/block/{}/ro",
        name(&rw.guest_device),
        name(&ro.guest_device)
    );
    let mounts = vec![
        bind_mount(GUEST_RW, "/rw", false),
        bind_mount(GUEST_RO, "/ro", false),
    ];
    let out = run_container(agent, &socket, "disks", &["sh", "-c", &script], mounts).await;
    println!("container on the disks: {out:?}");
    assert_eq!(out.exit_status, 0, "{out:?}");
    assert_eq!(
        out.stdout,
        format!("{HOST_FILE}{HOST_FILE}ro: refused\n0\n1\n"),
        "{out:?}"
    );
    assert!(out.stderr.contains("Read-only file system"), "{out:?}");

    agent.unmount(GUEST_RW).await.expect("unmounting");
    agent.unmount(GUEST_RO).await.expect("unmounting");
    vm.unplug_block(rw.slot)
        .await
        .expect("unplugging the image");
    vm.unplug_block(ro.slot).await.expect("unplugging the loop");
    assert_eq!(
        read_ext4_file(&rw_image, "/from-guest").as_deref(),
        Some(GUEST_FILE)
    );
    let held = open_files(holder);
    assert!(
        !held.contains(&rw_image) && !held.contains(&loop_path),
        "the VM let go of both: {held:?}"
    );
    let err = vm.unplug_block(rw.slot).await.unwrap_err().to_string();
    assert!(
        err.contains(&format!("slot {} holds no attached block device", rw.slot)),
        "{err}"
    );
    println!("after unplug: the guest's write is in the image; the VM holds neither");

    // Slots are reused, each plug shows its own device's size, and one
    // more than there are read-write slots is refused, saying why.
    // The first on ramfs, which refuses O_DIRECT: QEMU opens it buffered.
    let ramfs = Ramfs::mount(&scratch.path().join("ramfs"));
    let mut extras = Vec::new();
    for mib in 1..=4u64 {
        let dir = if mib == 1 { &ramfs.0 } else { scratch.path() };
        let path = dir.join(format!("extra{mib}.img"));
        fs::File::create(&path).unwrap().set_len(mib << 20).unwrap();
        let plugged = vm
            .plug_block(&BlockDevice {
                path,
                read_only: false,
            })
            .await
            .expect("plugging a raw image");
        extras.push(plugged);
    }
    let slots: Vec<u32> = extras.iter().map(|p| p.slot).collect();
    match config.hypervisor {
        // The slots the first two plugs freed are reused; the builtin VMM
        // has more free slots than this test fills.
        HypervisorKind::Builtin => assert_eq!(slots, [2, 3, 4, 5]),
        // microvm has 4 read-write standby slots, all in use now.
        HypervisorKind::Qemu => {
            assert_eq!(slots, [2, 3, 4, 5]);
            let err = vm
                .plug_block(&BlockDevice {
                    path: rw_image.clone(),
                    read_only: false,
                })
                .await
                .unwrap_err();
            println!("fifth read-write plug: {err}");
            assert!(matches!(err, SandboxError::Hypervisor(_)), "{err:?}");
            let err = err.to_string();
            assert!(
                err.contains("no free slot for") && err.contains("all 4 read-write block slots"),
                "{err}"
            );
        }
    }
    let err = vm
        .plug_block(&BlockDevice {
            path: scratch.path().join("absent.img"),
            read_only: true,
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("absent.img as a block device: no such file or device"),
        "{err}"
    );
    let sizes = extras
        .iter()
        .map(|p| format!("cat /sys/block/{}/size", name(&p.guest_device)))
        .collect::<Vec<_>>()
        .join(" && ");
    let out = run_container(agent, &socket, "sizes", &["sh", "-c", &sizes], vec![]).await;
    assert_eq!(out.stdout, "2048\n4096\n6144\n8192\n", "{out:?}");
    assert_eq!(
        open_modes(holder, &ramfs.0.join("extra1.img")),
        [(false, false)],
        "buffered on ramfs"
    );
    assert_eq!(
        open_modes(holder, &scratch.path().join("extra2.img")),
        [(false, direct)],
        "O_DIRECT (on qemu) on the scratch file system"
    );
    for plugged in &extras {
        vm.unplug_block(plugged.slot).await.expect("unplugging");
    }
    let listed = run_container(agent, &socket, "after", &["sh", "-c", LIST_DISKS], vec![]).await;
    assert_eq!(
        listed.stdout, "",
        "no disk is left in the guest: {listed:?}"
    );
    let held = open_files(holder);
    drop(ramfs);
    assert!(
        !held
            .iter()
            .any(|f| f.extension().is_some_and(|ext| ext == "img")),
        "the VM holds no image: {held:?}"
    );

    let shutdown = vm.shutdown().await;
    assert!(!shutdown.forced, "{shutdown:?}");
    drop(loop_device);
    let log = fs::read_to_string(&console).unwrap();
    assert!(!log.contains("panicked"), "console log:\n{log}");
    assert_nothing_left(
        scratch.path(),
        &pids,
        &[
            "console.log",
            "initramfs.cpio.gz",
            "content/file",
            "rw.img",
            "loop.img",
            "extra2.img",
            "extra3.img",
            "extra4.img",
        ],
    );
}
