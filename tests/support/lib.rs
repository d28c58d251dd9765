//! The harness of runv's integration tests: where the guest images are, a
//! configuration confined to a temporary directory, and the checks that a
//! test left nothing behind.

pub mod bench;
pub mod busybox;
pub mod cni;
pub mod containerd;
pub mod cri;
pub mod disks;
pub mod leaks;
pub mod smaps;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use runv_config::{Config, HypervisorKind, DEFAULT_SHARE_DIR};
use runv_protocol::{agent::GuestDetails, PROTOCOL_VERSION};

/// The guest kernel and initramfs under test: `RUNV_KERNEL` and
/// `RUNV_INITRAMFS` (set by scripts/test.sh to the freshly built ones),
/// else the installed ones.
pub fn guest_images() -> (PathBuf, PathBuf) {
    let pick = |var: &str, installed: &str| {
        let path = std::env::var_os(var)
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(DEFAULT_SHARE_DIR).join(installed));
        assert!(
            path.is_file(),
            "{} not found: run the tests through scripts/test.sh, which builds the guest \
             images, or set {var}",
            path.display()
        );
        path
    };
    (
        pick("RUNV_KERNEL", "vmlinux"),
        pick("RUNV_INITRAMFS", "runv-initramfs.cpio.gz"),
    )
}

/// The builtin hypervisor's root image under test: `RUNV_ROOT_IMAGE`, else
/// the one scripts/build-initramfs.sh built beside the initramfs under test.
pub fn root_image() -> PathBuf {
    let path = std::env::var_os("RUNV_ROOT_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| guest_images().1.with_file_name("runv-root.img"));
    assert!(
        path.is_file(),
        "{} not found: scripts/build-initramfs.sh builds it beside the initramfs, or set \
         RUNV_ROOT_IMAGE",
        path.display()
    );
    path
}

/// The hypervisor the end-to-end tests run on: `RUNV_TEST_HYPERVISOR`,
/// `qemu` (the default: it boots the guest on every host, under TCG where
/// KVM cannot run it) or `builtin` (scripts/test.sh runs the suite so where
/// KVM can boot the guest: on the host, or in the nested-KVM bed).
pub fn test_hypervisor() -> HypervisorKind {
    match std::env::var("RUNV_TEST_HYPERVISOR").as_deref() {
        Ok("builtin") => HypervisorKind::Builtin,
        Ok("qemu") | Err(_) => HypervisorKind::Qemu,
        Ok(other) => panic!("RUNV_TEST_HYPERVISOR={other}: use qemu or builtin"),
    }
}

/// Whether the test runs on `hypervisor`; otherwise prints why the test,
/// which checks what only that hypervisor has (`what`), is skipped.
pub fn only_on(hypervisor: HypervisorKind, what: &str) -> bool {
    let on = test_hypervisor();
    if on != hypervisor {
        println!("SKIPPED: {what} is the {hypervisor} hypervisor's; this run is on {on}");
    }
    on == hypervisor
}

/// The host programs a pod VM runs beside the shim: QEMU and its helpers
/// on qemu (virtiofsd when the pod shares a directory), none on builtin,
/// whose VM is in the shim's own process.
pub fn vm_helper_programs(shares: bool) -> Vec<&'static str> {
    match (test_hypervisor(), shares) {
        (HypervisorKind::Builtin, _) => Vec::new(),
        (HypervisorKind::Qemu, false) => vec!["qemu-system-x86_64", "vhost-device-vsock"],
        (HypervisorKind::Qemu, true) => {
            vec!["qemu-system-x86_64", "vhost-device-vsock", "virtiofsd"]
        }
    }
}

/// A configuration whose VMs keep everything under `scratch`, on the
/// [`test_hypervisor`].
pub fn test_config(scratch: &Path) -> Config {
    let (kernel, initramfs) = guest_images();
    let mut config = Config {
        hypervisor: test_hypervisor(),
        run_dir: scratch.join("run"),
        ..Config::default()
    };
    config.vm.kernel = kernel;
    config.vm.initramfs = initramfs;
    // As installed: builtin boots from the root image.
    if config.hypervisor == HypervisorKind::Builtin {
        config.builtin.root_image = Some(root_image());
    }
    // Benchmarks size the VM like the pod they measure (1 vCPU: a pod
    // without CPU limits, as installed).
    config.vm.vcpus = env_or("RUNV_TEST_VCPUS", 2);
    config.vm.memory_mib = env_or("RUNV_TEST_MEMORY_MIB", config.vm.memory_mib);
    // Several TCG guests may boot at once on two cores.
    config.vm.agent_timeout_secs = 180;
    // Tests boot wherever QEMU can, TCG included (not a security boundary).
    config.qemu.allow_tcg = true;
    config
}

/// Boots `config`'s VMs from `initramfs`, a test's own, on builtin too
/// (where the root image would otherwise take its place).
pub fn boot_from_initramfs(config: &mut Config, initramfs: PathBuf) {
    config.vm.initramfs = initramfs;
    config.builtin.root_image = None;
}

/// The setting `name` from the environment, else `default`.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Asserts that what the agent reports is the guest `config` describes:
/// the kernel built here, every vCPU online, the memory asked for, this
/// agent and protocol, and a wall clock set from the host.
pub fn assert_guest_matches(details: &GuestDetails, config: &Config) {
    assert!(
        details.kernel_release.starts_with("6."),
        "guest kernel: {}",
        details.kernel_release
    );
    assert_eq!(details.online_cpus, config.vm.vcpus);
    let memory_mib = details.memory_total_bytes / (1024 * 1024);
    let configured = u64::from(config.vm.memory_mib);
    assert!(
        memory_mib <= configured && memory_mib >= configured * 3 / 4,
        "guest sees {memory_mib} MiB of {configured}"
    );
    assert_eq!(details.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(details.protocol_version, PROTOCOL_VERSION);
    // The guest has no RTC: its clock comes from the host in the handshake.
    let host_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let skew = host_now.abs_diff(Duration::from_nanos(details.wall_clock_ns));
    assert!(skew < Duration::from_secs(5), "guest clock is {skew:?} off");
}

/// Host processes whose command line mentions `needle`, or whose working
/// directory is below it (a VM helper named only by fds).
pub fn processes_mentioning(needle: &Path) -> Vec<String> {
    let needle = needle.to_string_lossy().into_owned();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|entry| {
            let cmdline = fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            let cwd = fs::read_link(entry.path().join("cwd")).unwrap_or_default();
            (cmdline.contains(&needle) || cwd.starts_with(&needle))
                .then(|| format!("{}: {cmdline}", entry.file_name().to_string_lossy()))
        })
        .collect()
}

/// Starts the `hold-vm` helper (`binary`, which only integration tests can
/// name: `env!("CARGO_BIN_EXE_hold-vm")`) with `args`, and returns it with
/// the PIDs of the VM's processes, once it has booted the VM and printed
/// them.
pub fn spawn_vm_holder(binary: &str, args: &[&Path]) -> (std::process::Child, Vec<u32>) {
    let mut holder = Command::new(binary)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("starting hold-vm");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().expect("piped stdout")),
        &mut line,
    )
    .expect("reading hold-vm's PIDs");
    let pids = line
        .split_whitespace()
        .map(|pid| pid.parse().expect("hold-vm prints PIDs"))
        .collect();
    (holder, pids)
}

/// This process's threads whose name starts with `prefix`.
pub fn threads_named(prefix: &str) -> Vec<String> {
    let Ok(tasks) = fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| fs::read_to_string(task.path().join("comm")).ok())
        .map(|name| name.trim_end().to_owned())
        .filter(|name| name.starts_with(prefix))
        .collect()
}

/// Whether `pid` is a live (not zombie) process.
pub fn is_running(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
            !matches!(state, Some(Some('Z' | 'X')))
        })
        .unwrap_or(false)
}

/// Asserts that the VM's processes are gone, that no process refers to
/// `scratch`, and that nothing but `allowed` files is left in it (an entry
/// ending in `/` allows everything below that directory).
pub fn assert_nothing_left(scratch: &Path, vm_pids: &[u32], allowed: &[&str]) {
    // Reaping happens on the runtime's tasks: give it a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    while vm_pids.iter().any(|&pid| is_running(pid)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let alive: Vec<_> = vm_pids.iter().filter(|&&pid| is_running(pid)).collect();
    assert!(alive.is_empty(), "VM processes still running: {alive:?}");
    let mentioning = processes_mentioning(scratch);
    assert!(
        mentioning.is_empty(),
        "processes left behind: {mentioning:?}"
    );
    let mut left = Vec::new();
    collect_files(scratch, scratch, &mut left);
    left.retain(|file| {
        !allowed
            .iter()
            .any(|a| file == a || (a.ends_with('/') && file.starts_with(a)))
    });
    assert!(
        left.is_empty(),
        "files left behind in {}: {left:?}",
        scratch.display()
    );
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_files(root, &path, out);
        } else {
            out.push(
                path.strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
}

/// Builds an initramfs whose /init is a busybox shell that never starts an
/// agent: a guest that boots fine but never answers.
pub fn initramfs_without_agent(dir: &Path) -> PathBuf {
    initramfs_with_shell_init(
        dir,
        "no-agent",
        "/bin/busybox echo 'no agent in this initramfs'\nexec /bin/busybox sleep 3600\n",
    )
}

/// Builds `dir/<name>.cpio.gz`, an initramfs with busybox as /bin/busybox
/// whose /init runs `script` in busybox's shell.
pub fn initramfs_with_shell_init(dir: &Path, name: &str, script: &str) -> PathBuf {
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.is_file(),
        "/bin/busybox not found: install Debian's busybox-static (scripts/install.sh does)"
    );
    let root = dir.join(format!("{name}-root"));
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::copy(busybox, root.join("bin/busybox")).unwrap();
    fs::write(root.join("init"), format!("#!/bin/busybox sh\n{script}")).unwrap();
    Command::new("chmod")
        .arg("755")
        .arg(root.join("init"))
        .status()
        .unwrap();
    let image = dir.join(format!("{name}.cpio.gz"));
    let status = Command::new("sh")
        .arg("-c")
        .arg("find . | cpio --quiet -o -H newc | gzip -1 > \"$0\"")
        .arg(&image)
        .current_dir(&root)
        .status()
        .expect("running cpio");
    assert!(status.success(), "building the initramfs failed");
    fs::remove_dir_all(&root).unwrap();
    image
}

/// A process's proportional set size in KiB, from
/// /proc/<pid>/smaps_rollup; None once it is gone.
pub fn pss_kib(pid: u32) -> Option<u64> {
    let rollup = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    rollup
        .lines()
        .find_map(|line| line.strip_prefix("Pss:"))?
        .trim()
        .trim_end_matches(" kB")
        .parse()
        .ok()
}

/// Builds the attack program `tests/attack/<name>.c` static at `output`;
/// false (the caller skips) where there is no C compiler.
pub fn build_attack_program(name: &str, output: &Path) -> bool {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("attack/{name}.c"));
    match Command::new("cc")
        .args(["-static", "-O2", "-Wall", "-o"])
        .arg(output)
        .arg(&source)
        .status()
    {
        Ok(status) => {
            assert!(status.success(), "cc -static {} failed", source.display());
            true
        }
        Err(e) => {
            println!("SKIPPED: no C compiler (cc: {e}); apt-get install gcc libc6-dev");
            false
        }
    }
}
