//! A pod VM's host side is confined (docs/security.md). On qemu, for a
//! real pod VM with a shared directory, QEMU and vhost-device-vsock run
//! under the VM's own unprivileged uid with no capability and a seccomp
//! filter; virtiofsd runs as root under its seccomp filter without
//! CAP_MKNOD and CAP_FSETID, and maps the guest's extended attributes into
//! `user.virtiofs.`; TCG is refused unless the config allows it. On
//! builtin, every VMM thread runs under its seccomp filter, and the
//! in-process virtio-fs serves no extended attributes. On both, root in
//! the guest reaches no host attribute and makes no device node.

use std::{
    collections::BTreeMap, ffi::CString, fs, os::unix::ffi::OsStrExt, path::Path, time::Duration,
};

use runv_agent_client::ConnectOptions;
use runv_config::{AccelMode, HypervisorKind};
use runv_hypervisor::{confine::HELPER_UID_BASE, VmExit};
use runv_sandbox::PodVm;
use runv_tests::{
    assert_nothing_left, boot_from_initramfs, initramfs_with_shell_init, only_on, test_config,
};
use runv_vmm::THREAD_NAME_PREFIX;

const CAP_MKNOD: u32 = 27;
const CAP_FSETID: u32 = 4;

/// The fields of /proc/<pid>/status that confinement sets.
fn status(pid: u32) -> BTreeMap<String, String> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(key, value)| {
            let words: Vec<&str> = value.split_whitespace().collect();
            (key.to_owned(), words.join(" "))
        })
        .collect()
}

/// Whether the QEMU of `pid` runs its guest on KVM (`-accel kvm`).
fn uses_kvm(pid: u32) -> bool {
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    cmdline
        .split(|&byte| byte == 0)
        .collect::<Vec<_>>()
        .windows(2)
        .any(|pair| pair[0] == b"-accel" && pair[1].starts_with(b"kvm"))
}

/// The fields this test checks, for its output.
fn confinement_fields(status: &BTreeMap<String, String>) -> String {
    [
        "Uid",
        "Gid",
        "Groups",
        "CapEff",
        "CapBnd",
        "NoNewPrivs",
        "Seccomp",
    ]
    .map(|key| format!("{key}={}", status[key]))
    .join(" ")
}

fn cap_set(status: &BTreeMap<String, String>, set: &str) -> u64 {
    u64::from_str_radix(&status[set], 16).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_helper_process_is_confined() {
    if !only_on(HypervisorKind::Qemu, "confining helper processes") {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let config = test_config(scratch.path());
    let shared = scratch.path().join("shared");
    fs::create_dir(&shared).unwrap();
    let mut spec = PodVm::spec(&config, "confined", scratch.path().join("console.log"));
    spec.shared_dir = Some(shared);
    let connect = ConnectOptions::new(config.vm.agent_timeout());
    let vm = PodVm::boot(&config, spec, &connect)
        .await
        .expect("VM boots");
    let pids = vm.pids();
    let by_name: BTreeMap<String, u32> = pids
        .iter()
        .map(|&pid| {
            let exe = fs::read_link(format!("/proc/{pid}/exe")).unwrap();
            let name = exe.file_name().unwrap().to_string_lossy().into_owned();
            (name, pid)
        })
        .collect();
    let names: Vec<&str> = by_name.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        ["qemu-system-x86_64", "vhost-device-vsock", "virtiofsd"],
        "{pids:?}"
    );

    let mut helper_uid = None;
    for name in ["qemu-system-x86_64", "vhost-device-vsock"] {
        let status = status(by_name[name]);
        println!("{name}: {}", confinement_fields(&status));
        let uid = status["Uid"].split_whitespace().next().unwrap().to_owned();
        assert_eq!(
            status["Uid"],
            format!("{uid} {uid} {uid} {uid}"),
            "{name}: real, effective, saved and fs uid"
        );
        let uid: u32 = uid.parse().unwrap();
        assert!(uid >= HELPER_UID_BASE, "{name} runs as uid {uid}");
        assert_eq!(*helper_uid.get_or_insert(uid), uid, "one uid per VM");
        assert_eq!(status["Gid"], format!("{uid} {uid} {uid} {uid}"), "{name}");
        // QEMU on KVM reaches /dev/kvm through its group, its only one.
        let groups = match name == "qemu-system-x86_64" && uses_kvm(by_name[name]) {
            true => {
                use std::os::unix::fs::MetadataExt;
                fs::metadata("/dev/kvm").unwrap().gid().to_string()
            }
            false => String::new(),
        };
        assert_eq!(status["Groups"], groups, "{name}");
        for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(cap_set(&status, set), 0, "{name} {set}");
        }
        assert_eq!(status["NoNewPrivs"], "1", "{name}");
        assert_eq!(status["Seccomp"], "2", "{name}");
    }

    let status = status(by_name["virtiofsd"]);
    println!("virtiofsd: {}", confinement_fields(&status));
    assert_eq!(status["Seccomp"], "2", "virtiofsd");
    let effective = cap_set(&status, "CapEff");
    assert_ne!(
        effective, 0,
        "virtiofsd keeps what serving other uids needs"
    );
    for (cap, name) in [(CAP_MKNOD, "CAP_MKNOD"), (CAP_FSETID, "CAP_FSETID")] {
        assert_eq!(
            effective & (1 << cap),
            0,
            "virtiofsd has {name}: {effective:x}"
        );
    }

    let shutdown = vm.shutdown().await;
    assert!(!shutdown.forced, "the guest powered off when asked");
    assert_nothing_left(scratch.path(), &pids, &["console.log", "shared"]);
}

/// The builtin VM runs in this process: each of its threads (vCPUs, event
/// loop, virtio-fs worker, supervisor) has its seccomp filter and no new
/// privileges before the guest runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_builtin_vmm_thread_is_confined() {
    if !only_on(HypervisorKind::Builtin, "confining the VMM's threads") {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let config = test_config(scratch.path());
    let shared = scratch.path().join("shared");
    fs::create_dir(&shared).unwrap();
    let mut spec = PodVm::spec(&config, "confined", scratch.path().join("console.log"));
    spec.shared_dir = Some(shared);
    let connect = ConnectOptions::new(config.vm.agent_timeout());
    let vm = PodVm::boot(&config, spec, &connect)
        .await
        .expect("VM boots");
    let mut threads = BTreeMap::new();
    for task in fs::read_dir("/proc/self/task").unwrap().flatten() {
        let name = fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let name = name.trim();
        if name.starts_with(THREAD_NAME_PREFIX) {
            let tid: u32 = task.file_name().to_string_lossy().parse().unwrap();
            threads.insert(format!("{name} ({tid})"), status(tid));
        }
    }
    for (thread, status) in &threads {
        println!("{thread}: {}", confinement_fields(status));
        assert_eq!(status["Seccomp"], "2", "{thread}");
        assert_eq!(status["NoNewPrivs"], "1", "{thread}");
    }
    let names: Vec<&str> = threads.keys().map(String::as_str).collect();
    for kind in ["runv-vcpu", "runv-events", "runv-fs", "runv-vmm"] {
        assert!(
            names.iter().any(|name| name.starts_with(kind)),
            "no {kind} thread among {names:?}"
        );
    }
    let shutdown = vm.shutdown().await;
    assert!(!shutdown.forced, "the guest powered off when asked");
}

/// Without `qemu.allow_tcg`, a VM that would run with TCG does not start,
/// and the error names the key and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcg_is_refused_without_the_switch() {
    if !only_on(HypervisorKind::Qemu, "refusing TCG") {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let mut config = test_config(scratch.path());
    config.qemu.allow_tcg = false;
    // Forced, so that the test means the same on a host with KVM.
    config.qemu.accel = AccelMode::Tcg;
    let spec = PodVm::spec(&config, "no-tcg", scratch.path().join("console.log"));
    let connect = ConnectOptions::new(config.vm.agent_timeout());
    let err = PodVm::boot(&config, spec, &connect)
        .await
        .err()
        .expect("TCG is refused")
        .to_string();
    assert!(
        err.contains("qemu.allow_tcg = true") && err.contains("not a security boundary"),
        "{err}"
    );
    assert_nothing_left(scratch.path(), &[], &["console.log"]);
}

/// The guest's init: mount the share and run the probe on it as root.
const PROBE_SCRIPT: &str = r#"
/bin/busybox --install -s /bin
mount -t devtmpfs devtmpfs /dev
exec >/dev/console 2>&1 </dev/console
mkdir -p /share
mount -t virtiofs runv-shared /share || { echo "guest: mount failed"; reboot -f; }
/share/fs-probe /share/guest-file /share/host-file /share/disk
sync
reboot -f
"#;

/// The host's value of extended attribute `name` of `path`, if it has one.
fn host_xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let path = CString::new(path.as_os_str().as_bytes()).unwrap();
    let name = CString::new(name).unwrap();
    let mut value = [0u8; 256];
    // SAFETY: valid C strings and a buffer of the size given.
    let size = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    (size >= 0).then(|| value[..size as usize].to_vec())
}

fn host_xattr_names(path: &Path) -> Vec<String> {
    let path = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut names = [0u8; 1024];
    // SAFETY: a valid C string and a buffer of the size given.
    let size = unsafe { libc::llistxattr(path.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(size >= 0, "{}", std::io::Error::last_os_error());
    names[..size as usize]
        .split(|&b| b == 0)
        .filter(|name| !name.is_empty())
        .map(|name| String::from_utf8_lossy(name).into_owned())
        .collect()
}

fn set_host_xattr(path: &Path, name: &str, value: &[u8]) {
    let path = CString::new(path.as_os_str().as_bytes()).unwrap();
    let name = CString::new(name).unwrap();
    // SAFETY: valid C strings and a value of the size given.
    let rc = unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
}

/// Root in the guest, on the share: the host's `security.*` and
/// `trusted.*` attributes can be neither set nor read (the guest's land
/// under `user.virtiofs.`), `user.*` works, and no device node is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_cannot_set_host_xattrs_or_make_device_nodes() {
    let scratch = tempfile::tempdir().unwrap();
    let shared = scratch.path().join("shared");
    fs::create_dir(&shared).unwrap();
    if !runv_tests::build_attack_program("fs_probe", &shared.join("fs-probe")) {
        return;
    }
    fs::write(shared.join("guest-file"), "").unwrap();
    let host_file = shared.join("host-file");
    fs::write(&host_file, "").unwrap();
    set_host_xattr(&host_file, "trusted.host", b"host secret");
    set_host_xattr(&host_file, "user.host", b"host value");

    let mut config = test_config(scratch.path());
    boot_from_initramfs(
        &mut config,
        initramfs_with_shell_init(scratch.path(), "fs-probe", PROBE_SCRIPT),
    );
    let console = scratch.path().join("console.log");
    let mut spec = PodVm::spec(&config, "fs-probe", console.clone());
    spec.shared_dir = Some(shared.clone());
    let mut vm = runv_hypervisor::create(&config, spec);
    vm.start().await.expect("VM starts");
    let pids = vm.pids();
    let ended = tokio::time::timeout(Duration::from_secs(180), vm.exit_watch().unwrap().wait())
        .await
        .expect("the guest powers off by itself");
    let log = fs::read_to_string(&console).unwrap();
    assert_eq!(ended, VmExit::GuestShutdown, "console log:\n{log}");
    let probe: Vec<&str> = log
        .lines()
        .filter_map(|line| line.trim_end().strip_prefix("probe: "))
        .collect();
    println!("guest: {probe:#?}");
    let expected = match runv_tests::test_hypervisor() {
        // virtiofsd keeps the guest's attributes under user.virtiofs.
        HypervisorKind::Qemu => [
            "set security.capability: ok",
            "set trusted.guest: ok",
            "set user.guest: ok",
            "get user.guest: u",
            "get trusted.host: No data available",
            "get user.host: No data available",
            "mknod: Operation not permitted",
        ],
        // The in-process virtio-fs serves no extended attribute at all.
        HypervisorKind::Builtin => [
            "set security.capability: Operation not supported",
            "set trusted.guest: Operation not supported",
            "set user.guest: Operation not supported",
            "get user.guest: Operation not supported",
            "get trusted.host: Operation not supported",
            "get user.host: Operation not supported",
            "mknod: Operation not permitted",
        ],
    };
    assert_eq!(probe, expected, "console log:\n{log}");
    let guest_file = shared.join("guest-file");
    println!("host: {:?}", host_xattr_names(&guest_file));
    assert_eq!(host_xattr(&guest_file, "security.capability"), None);
    assert_eq!(host_xattr(&guest_file, "trusted.guest"), None);
    if runv_tests::test_hypervisor() == HypervisorKind::Qemu {
        assert_eq!(
            host_xattr(&guest_file, "user.virtiofs.trusted.guest").as_deref(),
            Some(&b"t"[..])
        );
    }
    assert!(!shared.join("disk").exists(), "no device node on the host");
    vm.stop(Duration::from_secs(5)).await;
    assert_nothing_left(
        scratch.path(),
        &pids,
        &["console.log", "fs-probe.cpio.gz", "shared/"],
    );
}
