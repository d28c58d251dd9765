//! The qemu backend's host processes are confined (docs/security.md): for
//! a real pod VM with a shared directory, QEMU and vhost-device-vsock run
//! under the VM's own unprivileged uid with no capability and a seccomp
//! filter; virtiofsd runs as root under its seccomp filter without
//! CAP_MKNOD and CAP_FSETID. And TCG is refused unless the config allows it.

use std::{collections::BTreeMap, fs};

use runv_agent_client::ConnectOptions;
use runv_config::AccelMode;
use runv_hypervisor::confine::HELPER_UID_BASE;
use runv_sandbox::PodVm;
use runv_tests::{assert_nothing_left, test_config};

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
        assert_eq!(status["Groups"], "", "{name} (TCG: no /dev/kvm group)");
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

/// Without `qemu.allow_tcg`, a VM that would run with TCG does not start,
/// and the error names the key and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcg_is_refused_without_the_switch() {
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
