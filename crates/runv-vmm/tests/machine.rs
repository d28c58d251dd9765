//! The whole microVM as its owner sees it (`MicroVm`), on real KVM, with
//! guest payloads of our own behind a PVH entry (they run on PVM hosts
//! too): boot to the payload, the console, the guest ending the VM, the
//! owner ending it, SMP threads, and nothing left afterwards. Skipped,
//! saying why, on hosts without a usable /dev/kvm.

mod common;

use std::{
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::mpsc,
    time::Duration,
};

use common::Console;
use runv_vmm::{
    device_manager::SlotIndex,
    testing::{namespaced_tap, print, pvh_image, RESET, SPIN},
    BlockConfig, FsConfig, GuestRoot, MicroVm, MicroVmConfig, NetConfig, VfioConfig, VmEnd,
    VmmError, VsockConfig, THREAD_NAME_PREFIX,
};

const END_TIMEOUT: Duration = Duration::from_secs(20);

struct Guest {
    _dir: tempfile::TempDir,
    kernel: PathBuf,
    initramfs: PathBuf,
    vsock: PathBuf,
}

/// A payload image in a temporary directory, or None (after saying why)
/// where KVM cannot be used.
fn guest(code: &[u8]) -> Option<Guest> {
    if !runv_vmm::testing::kvm_usable() {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("payload.elf");
    let initramfs = dir.path().join("initramfs");
    std::fs::write(&kernel, pvh_image(code)).unwrap();
    std::fs::write(&initramfs, b"unused by the payload").unwrap();
    let vsock = dir.path().join("vsock.sock");
    Some(Guest {
        _dir: dir,
        kernel,
        initramfs,
        vsock,
    })
}

fn config(guest: &Guest, vcpus: u8, console: &Console) -> MicroVmConfig {
    MicroVmConfig {
        name: "test".into(),
        kernel: guest.kernel.clone(),
        root: GuestRoot::Initramfs(guest.initramfs.clone()),
        kernel_params: "console=ttyS0".into(),
        vcpus,
        memory_bytes: 64 << 20,
        console: Box::new(console.clone()),
        vsock: Some(VsockConfig {
            guest_cid: 3,
            uds_path: guest.vsock.clone(),
        }),
        net_devices: Vec::new(),
        // A shared directory from boot on, as a pod VM has.
        filesystems: vec![FsConfig {
            tag: "shared".into(),
            shared_dir: guest._dir.path().to_owned(),
            read_only: false,
        }],
        vfio_devices: Vec::new(),
        // The payloads have no balloon driver; the slots below count from
        // the shared directory's.
        free_page_reporting: false,
        share_boot_files: true,
    }
}

/// Starts the VM and returns it with the channel its end is reported on.
fn start(config: MicroVmConfig) -> (MicroVm, mpsc::Receiver<VmEnd>) {
    let (ended, end) = mpsc::channel();
    let vm = MicroVm::start(
        config,
        Box::new(move |how| {
            let _ = ended.send(how);
        }),
    )
    .expect("the microVM starts");
    (vm, end)
}

/// This process's VMM threads: name, and the /proc directory of each.
fn vmm_tasks() -> Vec<(String, PathBuf)> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter_map(|task| {
            let name = std::fs::read_to_string(task.path().join("comm")).ok()?;
            Some((name.trim_end().to_owned(), task.path()))
        })
        .filter(|(name, _)| name.starts_with(THREAD_NAME_PREFIX))
        .collect()
}

fn vmm_threads() -> Vec<String> {
    vmm_tasks().into_iter().map(|(name, _)| name).collect()
}

/// Every VMM thread runs under a seccomp filter of its own (mode 2) with
/// no_new_privs, and each virtio-fs worker's root is one of `shares`.
fn assert_confined(shares: &[&Path]) {
    let shares: Vec<PathBuf> = shares.iter().map(|s| s.canonicalize().unwrap()).collect();
    for (name, task) in vmm_tasks() {
        let status = std::fs::read_to_string(task.join("status")).unwrap();
        for line in ["Seccomp:\t2", "NoNewPrivs:\t1"] {
            assert!(
                status.lines().any(|l| l == line),
                "{name}: no {line:?} in its status"
            );
        }
        let root = std::fs::read_link(task.join("root")).unwrap();
        if name == FS_WORKER {
            assert!(shares.contains(&root), "{name}'s root is {root:?}");
        } else {
            assert_eq!(root, Path::new("/"), "{name}'s root");
        }
    }
}

/// Hot-plugged devices other than shares add no thread: they run on the
/// VM's event loop.
fn assert_on_the_event_loop() {
    let own_threads = ["events", "vcpu0", "vmm"].map(|t| format!("{THREAD_NAME_PREFIX}{t}"));
    let threads = vmm_threads();
    assert!(
        threads
            .iter()
            .all(|t| own_threads.contains(t) || t == FS_WORKER),
        "the devices run on the VM's event loop: {threads:?}"
    );
}

const FS_WORKER: &str = runv_vmm::virtio::fs::worker::THREAD_NAME;

fn fs_workers() -> usize {
    vmm_threads().iter().filter(|t| *t == FS_WORKER).count()
}

/// Whether `done` holds within a second: a joined thread lingers in /proc
/// while the kernel finishes its exit.
fn eventually(mut done: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    while !done() {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

fn assert_gone(vsock: &Path) {
    let threads = vmm_threads();
    assert!(threads.is_empty(), "VMM threads left: {threads:?}");
    assert!(!vsock.exists(), "the vsock socket is removed");
}

// The tests of this file run one at a time: each counts the VMM's threads
// of the whole process.
#[test]
fn microvm_lifecycle() {
    the_guest_prints_and_ends_the_vm();
    the_owner_ends_a_guest_that_never_stops();
    a_bad_kernel_is_refused_and_leaves_nothing();
    passthrough_without_vfio_is_refused_and_leaves_nothing();
    devices_are_plugged_and_unplugged_while_the_guest_runs();
    network_interfaces_are_plugged_at_boot_and_while_the_guest_runs();
}

fn the_guest_prints_and_ends_the_vm() {
    let code = [print(b"payload up\n").as_slice(), &RESET].concat();
    let Some(guest) = guest(&code) else { return };
    let console = Console::default();
    let (vm, end) = start(config(&guest, 2, &console));
    let how = end
        .recv_timeout(END_TIMEOUT)
        .expect("the guest ends the VM");
    assert_eq!(how, VmEnd::GuestReset);
    assert_eq!(String::from_utf8_lossy(&console.bytes()), "payload up\n");
    // The end is reported once the vCPU and event-loop threads are gone.
    let threads = vmm_threads();
    assert!(
        threads
            .iter()
            .all(|t| *t == format!("{THREAD_NAME_PREFIX}vmm")),
        "only the supervisor, which reported the end, may still be running: {threads:?}"
    );
    drop(vm);
    assert_gone(&guest.vsock);
}

fn the_owner_ends_a_guest_that_never_stops() {
    let code = [print(b"spinning\n").as_slice(), &SPIN].concat();
    let Some(guest) = guest(&code) else { return };
    let console = Console::default();
    let (vm, end) = start(config(&guest, 2, &console));
    assert!(guest.vsock.exists(), "the hybrid vsock socket listens");
    // Meanwhile every thread has named itself (std does it from inside
    // the new thread).
    if let Ok(how) = end.recv_timeout(Duration::from_millis(300)) {
        panic!("the spinning guest ended: {how:?}");
    }
    let mut threads = vmm_threads();
    threads.sort();
    assert_eq!(
        threads,
        ["events", "fs", "vcpu0", "vcpu1", "vmm"].map(|t| format!("{THREAD_NAME_PREFIX}{t}")),
        "one event loop, one fs worker per share, one thread per vCPU, one supervisor"
    );
    assert_confined(&[guest._dir.path()]);
    vm.shutdown();
    assert_eq!(end.try_recv(), Ok(VmEnd::Stopped));
    assert!(String::from_utf8_lossy(&console.bytes()).contains("spinning"));
    drop(vm);
    assert_gone(&guest.vsock);
}

fn a_bad_kernel_is_refused_and_leaves_nothing() {
    let Some(guest) = guest(&SPIN) else { return };
    std::fs::write(&guest.kernel, b"not an ELF image").unwrap();
    let result = MicroVm::start(
        config(&guest, 1, &Console::default()),
        Box::new(|_| panic!("a VM that never started does not end")),
    );
    let err = result.err().expect("a bad kernel is refused").to_string();
    assert!(err.contains("payload.elf"), "{err}");
    assert_gone(&guest.vsock);
}

/// A VFIO function asked for on a host without VFIO: the VM is not
/// started, and the error says what the host lacks.
fn passthrough_without_vfio_is_refused_and_leaves_nothing() {
    if Path::new("/dev/vfio/vfio").exists() {
        return;
    }
    let Some(guest) = guest(&SPIN) else { return };
    let mut config = config(&guest, 1, &Console::default());
    config.vfio_devices = vec![VfioConfig {
        sysfs_path: "/sys/bus/pci/devices/0000:00:00.0".into(),
    }];
    let result = MicroVm::start(
        config,
        Box::new(|_| panic!("a VM that never started does not end")),
    );
    let err = result.err().expect("passthrough is refused").to_string();
    assert!(err.contains("modprobe vfio-pci"), "{err}");
    assert_gone(&guest.vsock);
}

/// How many of this process's descriptors are open on `path`.
fn open_descriptors_on(path: &Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target == path))
        .count()
}

/// Block and fs devices go into free slots next to the cold-plugged vsock
/// and run on the VM's one event loop; detaching one drops it (its
/// backend is closed) and frees the slot for the next.
fn devices_are_plugged_and_unplugged_while_the_guest_runs() {
    let Some(guest) = guest(&SPIN) else { return };
    let image = guest.kernel.with_file_name("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let shared = guest.kernel.with_file_name("shared");
    std::fs::create_dir(&shared).unwrap();
    let block = || BlockConfig {
        path: image.clone(),
        read_only: false,
        serial: "disk0".into(),
    };
    let (vm, end) = start(config(&guest, 1, &Console::default()));

    assert_eq!(
        vm.attach_block(block()).unwrap(),
        SlotIndex(2),
        "vsock holds 0, the shared directory of boot 1"
    );
    let fs = FsConfig {
        tag: "share".into(),
        shared_dir: shared.clone(),
        read_only: true,
    };
    assert_eq!(vm.attach_fs(fs).unwrap(), SlotIndex(3));
    assert_eq!(open_descriptors_on(&image), 1);
    assert_on_the_event_loop();
    assert_eq!(fs_workers(), 2, "each share has a worker of its own");
    assert_confined(&[guest._dir.path(), &shared]);

    vm.detach(SlotIndex(2)).unwrap();
    assert_eq!(open_descriptors_on(&image), 0, "the device is gone");
    let again = vm.detach(SlotIndex(2)).unwrap_err();
    assert!(
        matches!(again, VmmError::SlotNotInUse(SlotIndex(2))),
        "{again}"
    );
    assert_eq!(
        vm.attach_block(block()).unwrap(),
        SlotIndex(2),
        "slot reused"
    );
    vm.detach(SlotIndex(0)).unwrap();
    assert!(
        !guest.vsock.exists(),
        "the detached vsock removed its socket"
    );
    vm.detach(SlotIndex(3)).unwrap();
    assert!(
        eventually(|| fs_workers() == 1),
        "a detached share's worker ends"
    );
    assert!(end.try_recv().is_err(), "the guest still runs");

    vm.shutdown();
    assert_eq!(end.try_recv(), Ok(VmEnd::Stopped));
    let ended = vm.attach_block(block()).unwrap_err();
    assert!(ended.to_string().contains("ended"), "{ended}");
    drop(vm);
    assert_eq!(
        open_descriptors_on(&image),
        0,
        "dropping the VM drops its devices"
    );
    assert_gone(&guest.vsock);
}

/// How many of this process's descriptors are open on the tun device.
fn open_taps() -> usize {
    open_descriptors_on(Path::new("/dev/net/tun"))
}

/// A tap-backed network interface cold-plugged at boot takes the slot
/// after the shared directory's; one hot-plugged takes the next free slot
/// and runs on the VM's event loop; detaching it closes the device's
/// descriptor of the tap, and the owner's stays open.
fn network_interfaces_are_plugged_at_boot_and_while_the_guest_runs() {
    let Some(guest) = guest(&SPIN) else { return };
    let (boot_tap, hot_tap) = match (namespaced_tap("runvboot0"), namespaced_tap("runvhot0")) {
        (Ok(boot), Ok(hot)) => (boot, hot),
        (Err(why), _) | (_, Err(why)) => {
            println!("SKIPPED: no tap: {why}");
            return;
        }
    };
    let taps_before = open_taps();
    let mut config = config(&guest, 1, &Console::default());
    config.net_devices = vec![NetConfig {
        tap: boot_tap,
        mac: [0x02, 0, 0, 0, 0, 1],
    }];
    let (vm, end) = start(config);
    let net = NetConfig {
        tap: hot_tap.try_clone().unwrap(),
        mac: [0x02, 0, 0, 0, 0, 2],
    };
    assert_eq!(
        vm.attach_net(net).unwrap(),
        SlotIndex(3),
        "vsock 0, shared directory 1, the boot interface 2"
    );
    assert_eq!(open_taps(), taps_before + 1, "the device holds its tap");
    assert_on_the_event_loop();
    vm.detach(SlotIndex(3)).unwrap();
    assert_eq!(open_taps(), taps_before, "the device's tap is closed");
    // SAFETY: F_GETFD on a descriptor we hold.
    assert!(unsafe { libc::fcntl(hot_tap.as_raw_fd(), libc::F_GETFD) } >= 0);
    let not_a_tap = NetConfig {
        tap: std::fs::File::open(&guest.kernel).unwrap().into(),
        mac: [0x02, 0, 0, 0, 0, 3],
    };
    let err = vm.attach_net(not_a_tap).unwrap_err().to_string();
    assert!(err.contains("not a tap"), "{err}");
    assert!(end.try_recv().is_err(), "the guest still runs");
    vm.shutdown();
    drop(vm);
    assert_eq!(
        open_taps(),
        taps_before - 1,
        "the boot interface's tap is closed"
    );
    assert_gone(&guest.vsock);
}
