//! What a pod can leave behind on the host, taken as a footprint that a
//! test compares before and after: processes, mounts, network interfaces,
//! tc qdiscs and filters, network namespaces, pod addresses, loop
//! devices, cgroups, the files and sockets in runv's and containerd's
//! state, containers' snapshots, and containerd's open fds and RSS.
//!
//! Most of these are host-wide, so a test that compares footprints holds
//! [`exclusive`] for as long as it runs: no other test of its binary makes
//! or removes pods meanwhile.

use std::{
    collections::BTreeSet,
    fs,
    path::Path,
    process::Command,
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use crate::{cni, containerd::Containerd, processes_mentioning};

/// The host programs that serve pods: a leaked one is a leak wherever it
/// runs, not only under the test's directory.
const POD_PROGRAMS: [&str; 4] = [
    "containerd-shim-runv-v2",
    "qemu-system-x86_64",
    "vhost-device-vsock",
    "virtiofsd",
];

/// The directories whose entries at a depth are one pod's or container's
/// each (relative: below containerd's directory): runv's run_dir, the
/// shims' bundles (namespace/id), CRI's state and root per pod and
/// container, and the shims' sockets, which
/// containerd keeps in /run/containerd/s whatever its config says.
const STATE_DIRS: [(&str, usize); 6] = [
    ("run/pods", 1),
    ("state/io.containerd.runtime.v2.task", 2),
    ("state/io.containerd.grpc.v1.cri", 2),
    ("root/io.containerd.grpc.v1.cri/sandboxes", 1),
    ("root/io.containerd.grpc.v1.cri/containers", 1),
    ("/run/containerd/s", 1),
];

/// Serialises the tests of a binary that compare host-wide footprints.
pub fn exclusive() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    // A test that failed holding the lock poisons it; the next one still
    // runs (and its own footprint tells whether anything was left).
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One look at everything a pod may leave behind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Footprint {
    kinds: Vec<(&'static str, BTreeSet<String>)>,
    /// containerd's open file descriptors.
    pub containerd_fds: usize,
    /// containerd's resident set, in KiB.
    pub containerd_rss_kib: u64,
}

impl Footprint {
    /// The host as `containerd` and its pods leave it now.
    pub fn take(containerd: &Containerd) -> Footprint {
        let pid = containerd.pid();
        // The test network's bridge comes with the first pod and stays.
        let bridge = containerd.bridge().unwrap_or("\0");
        let not_the_bridge = |items: BTreeSet<String>| -> BTreeSet<String> {
            items
                .into_iter()
                .filter(|item| !item.contains(bridge))
                .collect()
        };
        Footprint {
            kinds: vec![
                ("process", pod_processes(containerd)),
                ("mount", mount_points()),
                (
                    "network interface",
                    not_the_bridge(lines_of("ip", &["-o", "link", "show"], 1)),
                ),
                ("tc qdisc or filter", not_the_bridge(traffic_control())),
                ("network namespace", entries("/run/netns")),
                ("pod address", reserved_addresses(containerd.dir())),
                ("loop device", loop_devices()),
                ("cgroup", cgroups()),
                ("state file or socket", state_files(containerd.dir())),
                ("container snapshot", active_snapshots(containerd)),
            ],
            containerd_fds: fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count),
            containerd_rss_kib: rss_kib(pid),
        }
    }

    /// What is here now and was not in `baseline`, each named by its kind.
    pub fn leaks_since(&self, baseline: &Footprint) -> Vec<String> {
        self.kinds
            .iter()
            .zip(&baseline.kinds)
            .flat_map(|((kind, now), (_, before))| {
                now.difference(before)
                    .map(move |item| format!("{kind}: {item}"))
            })
            .collect()
    }

    /// Takes footprints until nothing is left beyond `baseline` (removal
    /// ends asynchronously: a shim's exit, containerd's garbage collection
    /// of snapshots) or `patience` has passed; returns the last footprint
    /// and what it still has.
    pub fn settle(
        containerd: &Containerd,
        baseline: &Footprint,
        patience: Duration,
    ) -> (Footprint, Vec<String>) {
        let deadline = Instant::now() + patience;
        loop {
            let now = Footprint::take(containerd);
            let leaks = now.leaks_since(baseline);
            if leaks.is_empty() || Instant::now() > deadline {
                return (now, leaks);
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Asserts that the host is back to `baseline` within 30 s, naming
    /// whatever was left.
    pub fn assert_back_to(containerd: &Containerd, baseline: &Footprint) -> Footprint {
        let (now, leaks) = Footprint::settle(containerd, baseline, Duration::from_secs(30));
        assert!(leaks.is_empty(), "left behind:\n  {}", leaks.join("\n  "));
        now
    }
}

/// Processes of this containerd other than containerd itself, and pod
/// programs anywhere on the host.
fn pod_processes(containerd: &Containerd) -> BTreeSet<String> {
    let daemon = format!("{}: ", containerd.pid());
    let mut found: BTreeSet<String> = processes_mentioning(containerd.dir())
        .into_iter()
        .filter(|process| !process.starts_with(&daemon))
        .collect();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(comm) = fs::read_to_string(entry.path().join("comm")) else {
            continue;
        };
        // comm is cut at 15 bytes.
        let comm = comm.trim_end();
        if POD_PROGRAMS
            .iter()
            .any(|program| program.get(..15).unwrap_or(program) == comm)
        {
            found.insert(format!("{}: {comm}", entry.file_name().to_string_lossy()));
        }
    }
    found
}

/// Every mount point this process sees, with its file system type.
fn mount_points() -> BTreeSet<String> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let point = line.split(' ').nth(4)?;
            let fs_type = line.split(" - ").nth(1)?.split(' ').next()?;
            Some(format!("{point} ({fs_type})"))
        })
        .collect()
}

/// Field `field` (whitespace-separated, from 0) of each line `program
/// args` prints, or the whole line with `usize::MAX`.
fn lines_of(program: &str, args: &[&str], field: usize) -> BTreeSet<String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| match field {
            usize::MAX => Some(line.trim().to_owned()),
            n => line.split_whitespace().nth(n).map(str::to_owned),
        })
        .collect()
}

/// The host namespace's qdiscs, and the filters on each interface's
/// ingress and egress (runv's taps are redirected with tc in the pod's
/// namespace; a filter left in the host's would be a leak).
fn traffic_control() -> BTreeSet<String> {
    let mut found = lines_of("tc", &["qdisc", "show"], usize::MAX);
    for link in lines_of("ip", &["-o", "link", "show"], 1) {
        let device = link
            .trim_end_matches(':')
            .split('@')
            .next()
            .unwrap_or_default();
        for direction in ["ingress", "egress"] {
            for filter in lines_of(
                "tc",
                &["filter", "show", "dev", device, direction],
                usize::MAX,
            ) {
                found.insert(format!("{device} {direction}: {filter}"));
            }
        }
    }
    found
}

fn entries(dir: impl AsRef<Path>) -> BTreeSet<String> {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect()
}

/// The pod addresses the CNI IPAM plugin holds (host-local keeps a file
/// named by each address in its data directory, beside its own lock and
/// last-reserved files).
fn reserved_addresses(containerd_dir: &Path) -> BTreeSet<String> {
    entries(containerd_dir.join(cni::IPAM_DIR).join(cni::NETWORK_NAME))
        .into_iter()
        .filter(|name| name.parse::<std::net::IpAddr>().is_ok())
        .collect()
}

/// The snapshots containers' root file systems are made of (active
/// ones: image layers are committed and stay, as a node's image cache).
fn active_snapshots(containerd: &Containerd) -> BTreeSet<String> {
    let output = containerd
        .ctr_command(&["snapshots", "ls"])
        .output()
        .expect("running ctr snapshots ls");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.split_whitespace().last() == Some("Active"))
        .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// Attached loop devices and their backing files.
fn loop_devices() -> BTreeSet<String> {
    entries("/sys/block")
        .into_iter()
        .filter(|name| name.starts_with("loop"))
        .filter_map(|name| {
            let backing =
                fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
            Some(format!("{name} on {}", backing.trim_end()))
        })
        .collect()
}

/// Every cgroup directory of every hierarchy.
fn cgroups() -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    collect_dirs(Path::new("/sys/fs/cgroup"), &mut found);
    found
}

fn collect_dirs(dir: &Path, found: &mut BTreeSet<String>) {
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
            found.insert(entry.path().to_string_lossy().into_owned());
            collect_dirs(&entry.path(), found);
        }
    }
}

/// The files, sockets and directories of pods and containers in
/// [`STATE_DIRS`].
fn state_files(containerd_dir: &Path) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (dir, depth) in STATE_DIRS {
        collect_paths(&containerd_dir.join(dir), depth, &mut found);
    }
    found
}

fn collect_paths(dir: &Path, depth: usize, found: &mut BTreeSet<String>) {
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if depth == 1 {
            found.insert(entry.path().display().to_string());
        } else {
            collect_paths(&entry.path(), depth - 1, found);
        }
    }
}

fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or(0)
}
