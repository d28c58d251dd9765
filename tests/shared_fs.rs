//! virtio-fs on the test hypervisor (the real virtiofsd on qemu, the
//! in-process device on builtin), with the real guest kernel and agent: the agent mounts the host's shared directory at boot; files
//! travel both ways; a container root file system (an overlay mount)
//! bind-mounted under the share while the VM runs is seen by the guest; and
//! virtiofsd never outlives its VM (on qemu).
//!
//! The agent's container calls are not there yet, so two guests do the
//! guest's part: the real agent (its MountVirtioFs checks that the share
//! answers and logs what the share holds, which the test reads on the
//! console), and a busybox /init that mounts the share itself and reads and
//! writes files in it, on the same hypervisor path.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use runv_agent_client::ConnectOptions;
use runv_config::HypervisorKind;
use runv_hypervisor::{HypervisorError, VmExit};
use runv_protocol::{GUEST_SHARED_DIR, SHARED_FS_TAG};
use runv_sandbox::{PodVm, SandboxError};
use runv_tests::{
    assert_nothing_left, boot_from_initramfs, initramfs_with_shell_init, is_running, only_on,
    spawn_vm_holder, test_config, vm_helper_programs,
};

/// A host directory with one file in it, to be shared.
fn shared_dir(scratch: &Path) -> PathBuf {
    let shared = scratch.join("shared");
    fs::create_dir(&shared).unwrap();
    fs::write(shared.join("from-host.txt"), "hello from the host\n").unwrap();
    shared
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_mounts_the_share_at_boot_and_virtiofsd_ends_with_the_vm() {
    let scratch = tempfile::tempdir().unwrap();
    let mut config = test_config(scratch.path());
    // The agent lists the share's names at debug level.
    config.log_level = "debug".into();
    let console = scratch.path().join("console.log");
    let mut spec = PodVm::spec(&config, "share", console.clone());
    spec.shared_dir = Some(shared_dir(scratch.path()));
    let connect = ConnectOptions::new(config.vm.agent_timeout());

    let vm = PodVm::boot(&config, spec, &connect)
        .await
        .expect("VM boots");
    assert_eq!(vm.guest_shared_dir(), Some(Path::new(GUEST_SHARED_DIR)));
    let pids = vm.pids();
    let helpers = vm_helper_programs(true);
    assert_eq!(pids.len(), helpers.len(), "{helpers:?}: {pids:?}");
    assert!(pids.iter().all(|&pid| is_running(pid)));
    // A second mount of the same tag at the same place changes nothing.
    vm.agent()
        .mount_virtio_fs(SHARED_FS_TAG, GUEST_SHARED_DIR)
        .await
        .expect("mounting again is a no-op");
    let err = vm
        .agent()
        .mount_virtio_fs("no-such-tag", "/run/elsewhere")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("NOT_FOUND")
            && err.contains("no virtio-fs device tagged")
            && err.contains("runv-shared"),
        "names the tags there are: {err}"
    );

    let shutdown = vm.shutdown().await;
    assert!(!shutdown.forced, "{shutdown:?}");
    assert_eq!(shutdown.exit, VmExit::GuestShutdown);
    let log = fs::read_to_string(&console).unwrap();
    let mounted = log
        .lines()
        .filter(|line| line.contains("virtio-fs share mounted"))
        .collect::<Vec<_>>();
    println!("agent on the console: {mounted:#?}");
    assert!(
        mounted.first().is_some_and(|line| {
            line.contains("tag=\"runv-shared\"")
                && line.contains("mount_point=/run/runv/shared")
                && line.contains("entries=1")
                && line.contains("already=false")
        }),
        "console log:\n{log}"
    );
    assert!(
        mounted
            .get(1)
            .is_some_and(|line| line.contains("already=true")),
        "console log:\n{log}"
    );
    assert!(
        log.contains("entries=[\"from-host.txt\"]"),
        "the guest lists the host's file; console log:\n{log}"
    );
    assert_nothing_left(scratch.path(), &pids, &["console.log", "shared/"]);
}

/// The guest half of the data test: mounts the share, reads the host's
/// file, writes one, then waits for the container root file system the
/// host mounts under the share after boot, reads the image's file there and
/// writes into it, and powers off.
const GUEST_SCRIPT: &str = r#"
/bin/busybox --install -s /bin
mount -t devtmpfs devtmpfs /dev
exec >/dev/console 2>&1 </dev/console
mkdir -p /share
mount -t virtiofs runv-shared /share || { echo "guest: mount failed"; reboot -f; }
echo "guest read: $(cat /share/from-host.txt)"
echo "written by the guest" > /share/from-guest.txt
i=0
while [ ! -e /share/rootfs/image.txt ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done
echo "guest read in the late mount: $(cat /share/rootfs/image.txt)"
echo "written into the container rootfs" > /share/rootfs/from-guest.txt
sync
reboot -f
"#;

/// A mount that is undone when dropped, so that a failing test leaves no
/// mount behind.
struct TestMount(PathBuf);

impl TestMount {
    fn new(source: &Path, target: &Path, fstype: Option<&str>, data: Option<&str>) -> TestMount {
        let flags = if fstype.is_some() {
            MsFlags::empty()
        } else {
            MsFlags::MS_BIND
        };
        mount(Some(source), target, fstype, flags, data).unwrap_or_else(|e| {
            panic!("mounting {} on {}: {e}", source.display(), target.display())
        });
        TestMount(target.to_owned())
    }
}

impl Drop for TestMount {
    fn drop(&mut self) {
        let _ = umount2(&self.0, MntFlags::MNT_DETACH);
    }
}

/// The file's text once it holds a whole line: the guest's shell creates
/// the file before it writes, and a busy host may look in between.
fn wait_for_file(path: &Path, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        match fs::read_to_string(path) {
            Ok(text) if text.ends_with('\n') => return text,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "{} never got a whole line",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_travel_both_ways_and_a_rootfs_mounted_after_boot_is_seen() {
    let scratch = tempfile::tempdir().unwrap();
    let mut config = test_config(scratch.path());
    boot_from_initramfs(
        &mut config,
        initramfs_with_shell_init(scratch.path(), "share-rw", GUEST_SCRIPT),
    );
    let console = scratch.path().join("console.log");
    let shared = shared_dir(scratch.path());
    let mut spec = PodVm::spec(&config, "share-rw", console.clone());
    spec.shared_dir = Some(shared.clone());
    // A container root file system as the snapshotter gives it: an overlay
    // of an image layer and a writable layer.
    let layers = scratch.path().join("layers");
    for dir in ["lower", "upper", "work", "rootfs"] {
        fs::create_dir_all(layers.join(dir)).unwrap();
    }
    fs::write(layers.join("lower/image.txt"), "from the image layer\n").unwrap();

    let mut vm = runv_hypervisor::create(&config, spec);
    vm.start().await.expect("VM starts");
    let pids = vm.pids();
    let mut exit = vm.exit_watch().unwrap();

    // The guest's write shows on the host: the VM is up and the share
    // mounted, so what the host mounts now comes after boot.
    let written = tokio::task::spawn_blocking({
        let path = shared.join("from-guest.txt");
        move || wait_for_file(&path, Duration::from_secs(120))
    })
    .await
    .unwrap();
    assert_eq!(written, "written by the guest\n");
    let overlay = TestMount::new(
        Path::new("overlay"),
        &layers.join("rootfs"),
        Some("overlay"),
        Some(&format!(
            "lowerdir={},upperdir={},workdir={}",
            layers.join("lower").display(),
            layers.join("upper").display(),
            layers.join("work").display()
        )),
    );
    fs::create_dir(shared.join("rootfs")).unwrap();
    let bind = TestMount::new(&layers.join("rootfs"), &shared.join("rootfs"), None, None);

    let ended = tokio::time::timeout(Duration::from_secs(180), exit.wait())
        .await
        .expect("the guest powers off by itself");
    let log = fs::read_to_string(&console).unwrap();
    assert_eq!(ended, VmExit::GuestShutdown, "console log:\n{log}");
    assert!(
        log.contains("guest read: hello from the host"),
        "console log:\n{log}"
    );
    assert!(
        log.contains("guest read in the late mount: from the image layer"),
        "console log:\n{log}"
    );
    // The guest's write went through the bind mount into the overlay's
    // writable layer.
    assert_eq!(
        fs::read_to_string(layers.join("upper/from-guest.txt")).unwrap(),
        "written into the container rootfs\n"
    );
    vm.stop(Duration::from_secs(5)).await;
    drop(bind);
    drop(overlay);
    assert_nothing_left(
        scratch.path(),
        &pids,
        &["console.log", "share-rw.cpio.gz", "shared/", "layers/"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_ends_when_virtiofsd_dies() {
    if !only_on(HypervisorKind::Qemu, "virtiofsd") {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let config = test_config(scratch.path());
    let mut spec = PodVm::spec(&config, "fsdies", scratch.path().join("console.log"));
    spec.shared_dir = Some(shared_dir(scratch.path()));
    let mut vm = runv_hypervisor::create(&config, spec);
    vm.start().await.expect("VM starts");
    let pids = vm.pids();
    let virtiofsd = *pids
        .iter()
        .find(|&&pid| {
            fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm == "virtiofsd\n")
        })
        .expect("virtiofsd is one of the VM's processes");

    // Once the guest runs, not while QEMU is still connecting to it.
    let console = scratch.path().join("console.log");
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !fs::read_to_string(&console).is_ok_and(|log| log.contains("runv-agent ready")) {
            assert!(Instant::now() < deadline, "the agent never came up");
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(virtiofsd as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(30), vm.exit_watch().unwrap().wait())
        .await
        .expect("the VM ends without its file system backend");
    match &ended {
        VmExit::Failed(why) => assert!(why.starts_with("virtiofsd exited (signal: 9"), "{why}"),
        other => panic!("expected a virtiofsd failure, got: {other}"),
    }
    vm.stop(Duration::from_secs(5)).await;
    assert_nothing_left(scratch.path(), &pids, &["console.log", "shared/"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_virtiofsd_is_named_before_anything_starts() {
    if !only_on(HypervisorKind::Qemu, "virtiofsd") {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let err =
        boot_with_virtiofsd(scratch.path(), scratch.path().join("no-virtiofsd"), "nofs").await;
    assert!(
        matches!(
            err,
            SandboxError::Hypervisor(HypervisorError::MissingProgram { .. })
        ),
        "{err}"
    );
    let message = err.to_string();
    println!("{message}");
    assert!(
        message.contains("no-virtiofsd")
            && message.contains("cargo install --locked --root /usr/local virtiofsd@1.14.0")
            && message.contains("scripts/install.sh")
            && message.contains("qemu.virtiofsd_binary"),
        "{message}"
    );
    assert_nothing_left(scratch.path(), &[], &["shared/"]);
    assert!(
        !scratch.path().join("console.log").exists(),
        "QEMU never ran"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtiofsd_that_fails_to_start_leaves_nothing() {
    if !only_on(HypervisorKind::Qemu, "virtiofsd") {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let failing = scratch.path().join("failing-virtiofsd");
    fs::write(
        &failing,
        "#!/bin/sh\necho 'virtiofsd: cannot serve this' >&2\nexit 1\n",
    )
    .unwrap();
    Command::new("chmod")
        .arg("755")
        .arg(&failing)
        .status()
        .unwrap();
    let err = boot_with_virtiofsd(scratch.path(), failing, "fsfails").await;
    let message = err.to_string();
    assert!(
        message.starts_with("virtiofsd failed to start: it exited (exit status: 1)")
            && message.contains("virtiofsd: cannot serve this"),
        "{message}"
    );
    // vhost-device-vsock, started beside it, is gone too.
    assert_nothing_left(scratch.path(), &[], &["failing-virtiofsd", "shared/"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_vm_takes_virtiofsd_along() {
    let scratch = tempfile::tempdir().unwrap();
    let config = test_config(scratch.path());
    let mut spec = PodVm::spec(&config, "fsdropped", scratch.path().join("console.log"));
    spec.shared_dir = Some(shared_dir(scratch.path()));
    let connect = ConnectOptions::new(config.vm.agent_timeout());

    let vm = PodVm::boot(&config, spec, &connect)
        .await
        .expect("VM boots");
    let pids = vm.pids();
    assert_eq!(pids.len(), vm_helper_programs(true).len(), "{pids:?}");
    drop(vm);
    assert_nothing_left(scratch.path(), &pids, &["console.log", "shared/"]);
}

#[test]
fn killed_owner_takes_virtiofsd_along() {
    let scratch = tempfile::tempdir().unwrap();
    let shared = shared_dir(scratch.path());
    let (mut owner, pids) =
        spawn_vm_holder(env!("CARGO_BIN_EXE_hold-vm"), &[scratch.path(), &shared]);
    assert_eq!(
        pids.len(),
        vm_helper_programs(true).len(),
        "hold-vm printed {pids:?}"
    );
    assert!(pids.iter().all(|&pid| is_running(pid)));

    owner.kill().unwrap();
    owner.wait().unwrap();
    // The parent-death signal kills virtiofsd with the other helpers; the
    // VM directory stays for the shim's delete to remove.
    assert_nothing_left(
        scratch.path(),
        &pids,
        &["console.log", "run/held/", "shared/"],
    );
}

/// Boot to agent-ready (and the share mounted), with and without a shared
/// directory, one VM at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_time_with_and_without_the_share() {
    const ROUNDS: usize = 3;
    let scratch = tempfile::tempdir().unwrap();
    let config = test_config(scratch.path());
    let shared = shared_dir(scratch.path());
    let connect = ConnectOptions::new(config.vm.agent_timeout());
    let mut times: [Vec<Duration>; 2] = Default::default();
    for round in 0..ROUNDS {
        for (with_share, samples) in times.iter_mut().enumerate() {
            let id = format!("timed-{round}-{with_share}");
            let mut spec = PodVm::spec(&config, &id, scratch.path().join(format!("{id}.log")));
            spec.shared_dir = (with_share == 1).then(|| shared.clone());
            let started = Instant::now();
            let vm = PodVm::boot(&config, spec, &connect)
                .await
                .expect("VM boots");
            samples.push(started.elapsed());
            vm.shutdown().await;
        }
    }
    let median = |samples: &mut Vec<Duration>| {
        samples.sort();
        samples[samples.len() / 2]
    };
    let [without, with] = &mut times;
    println!(
        "boot to agent ready, median of {ROUNDS} ({}): without share {:.0} ms, with share \
         {:.0} ms (all: {without:?} / {with:?})",
        config.hypervisor,
        median(without).as_secs_f64() * 1000.0,
        median(with).as_secs_f64() * 1000.0,
    );
}

/// Boots VM `id` with a shared directory served by `virtiofsd`, which must
/// fail; returns the error.
async fn boot_with_virtiofsd(scratch: &Path, virtiofsd: PathBuf, id: &str) -> SandboxError {
    let mut config = test_config(scratch);
    config.qemu.virtiofsd_binary = virtiofsd;
    let mut spec = PodVm::spec(&config, id, scratch.join("console.log"));
    spec.shared_dir = Some(shared_dir(scratch));
    let connect = ConnectOptions::new(config.vm.agent_timeout());
    PodVm::boot(&config, spec, &connect)
        .await
        .err()
        .expect("no virtiofsd, no VM")
}
