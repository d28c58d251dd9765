//! What a pod VM may take of the host, through containerd's CRI plugin on
//! the qemu hypervisor: its host processes (QEMU, virtiofsd,
//! vhost-device-vsock and the shim) run in the sandbox's cgroup under a
//! pod cgroup parent nothing else made, which bounds the VM's memory and
//! CPU and answers PodSandboxStats, and goes with the pod; containerd sees
//! the shim's PID as every task's; a guest flooding its serial console
//! leaves at most the capped log on the host.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use k8s_cri::v1::{
    ContainerStatusRequest, LinuxContainerResources, LinuxContainerSecurityContext,
    LinuxSandboxSecurityContext, PodSandboxStatsRequest,
};
use runv_config::Config;
use runv_tests::{
    containerd::Containerd,
    cri::{
        app_config, pod_config, pod_processes, remove_pods, run_pod, start_app, CriClient, SHIM,
    },
};

/// The host memory the shim gives a VM on top of its guest RAM
/// (runv-shim's host_cgroup::HOST_OVERHEAD_MIB).
const HOST_OVERHEAD_MIB: u64 = 256;
/// The console log cap of the flood test (`vm.console_log_kib`), small
/// enough to fill through an emulated serial port: each byte the guest
/// writes to it is a VM exit, which in L1 costs about a millisecond (the
/// console unit test pushes 100 MiB through the default 1 MiB cap).
const CONSOLE_LOG_KIB: u64 = 16;
/// What the guest writes to its console: four times the cap.
const FLOOD_KIB: u64 = 4 * CONSOLE_LOG_KIB;

#[tokio::test(flavor = "multi_thread")]
async fn the_pod_cgroup_holds_bounds_and_reports_the_vm() {
    if cgroup_root().is_none() {
        println!("SKIPPED: no cgroup file system at /sys/fs/cgroup");
        return;
    }
    let Some(containerd) = Containerd::start_with_cri() else {
        return;
    };
    let runv = Config::load(&containerd.runv_config()).unwrap();
    let mut cri = CriClient::with_pod_images(&containerd).await;
    let log_dir = containerd.dir().join("pod-logs");
    fs::create_dir_all(&log_dir).unwrap();

    // A cgroup parent of this run's own: nothing earlier made it.
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let top = format!("runv-test-{}-{nanos}", std::process::id());
    let parent = format!("/{top}/pod-limited");
    assert!(cgroup_dirs(&top).is_empty(), "{top} exists already");
    let mut config = pod_config("cgroup", &log_dir);
    let linux = config.linux.as_mut().unwrap();
    linux.cgroup_parent = parent.clone();
    linux.resources = Some(LinuxContainerResources {
        cpu_period: 100_000,
        cpu_quota: 100_000,
        memory_limit_in_bytes: 128 << 20,
        ..Default::default()
    });
    let pod = run_pod(&mut cri, &config).await;
    let cgroup = format!("{parent}/{pod}");
    println!("pod cgroup: {cgroup}");

    // Every host process of the VM, the shim and the helpers it spawned,
    // is in the pod's cgroup, in every hierarchy.
    let shim_pid = only_pid(&containerd, SHIM);
    let helpers = children(shim_pid);
    for program in runv_tests::vm_helper_programs(true) {
        // /proc/<pid>/comm keeps 15 bytes of the name.
        let comm = &program[..program.len().min(15)];
        assert!(
            helpers.iter().any(|(_, name)| name == comm),
            "no {program} among the shim's children {helpers:?}"
        );
    }
    let pids = std::iter::once(shim_pid).chain(helpers.iter().map(|(pid, _)| *pid));
    for pid in pids {
        let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        let program = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
        println!("{} ({pid}):\n{cgroups}", program.trim());
        for line in cgroups.lines().filter(|line| !line.ends_with(":/")) {
            assert!(
                line.ends_with(&format!(":{cgroup}")),
                "{program} ({pid}) is not in {cgroup}: {line}"
            );
        }
        assert!(cgroups.contains(&cgroup), "{program}: {cgroups}");
    }

    // The VM's size plus the overhead bounds it: 1 vCPU (up to the cap)
    // and 128 MiB of the pod's on top of the base VM.
    let memory_mib = u64::from(runv.vm.memory_mib) + 128 + HOST_OVERHEAD_MIB;
    let (limit, usage) = memory_limit_and_usage(&cgroup);
    println!("memory limit {limit}, usage {usage}");
    assert_eq!(limit, memory_mib << 20, "memory limit of {cgroup}");
    assert!(usage > 0 && usage <= limit, "usage {usage} within {limit}");
    let quota = cpu_quota(&cgroup);
    println!("CPU quota/period: {quota:?}");
    let vcpus = (runv.vm.vcpus + 1).min(runv.vm.vcpu_cap());
    assert_eq!(
        quota,
        (u64::from(vcpus) * 100_000, 100_000),
        "one CPU per vCPU"
    );

    // PodSandboxStats reads the pod's cgroup parent, which the shim made.
    let stats = cri
        .runtime
        .pod_sandbox_stats(PodSandboxStatsRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .expect("PodSandboxStats on a fresh cgroup parent")
        .into_inner()
        .stats
        .and_then(|stats| stats.linux)
        .expect("Linux pod stats");
    let working_set = stats
        .memory
        .and_then(|memory| memory.working_set_bytes)
        .map_or(0, |bytes| bytes.value);
    println!("PodSandboxStats working set: {working_set}");
    assert!(working_set > 0, "the pod's stats count the VM's memory");

    // containerd's task PIDs are the shim's: the sandbox's (Connect, in
    // `ctr task ls`) and an app container's (Create and Start, in CRI's
    // status).
    let app = start_app(&mut cri, &pod, &config, app_config("pid")).await;
    let tasks = containerd.ctr_ok(&["task", "ls"]);
    println!("ctr task ls:\n{tasks}");
    for id in [&pod, &app] {
        let line = tasks.lines().find(|line| line.starts_with(id.as_str()));
        let pid = line.and_then(|line| line.split_whitespace().nth(1));
        assert_eq!(pid, Some(shim_pid.to_string().as_str()), "task {id}");
    }
    let status = cri
        .runtime
        .container_status(ContainerStatusRequest {
            container_id: app.clone(),
            verbose: true,
        })
        .await
        .expect("ContainerStatus")
        .into_inner();
    let info: serde_json::Value = serde_json::from_str(&status.info["info"]).unwrap();
    assert_eq!(info["pid"], shim_pid, "CRI's pid of {app}");

    remove_pods(&containerd, &mut cri, &[&pod]).await;
    let left = cgroup_dirs(&top);
    assert!(left.is_empty(), "cgroups left after the pod: {left:?}");
    containerd.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_guest_flooding_its_console_fills_only_the_capped_log() {
    let Some(containerd) = Containerd::start_with_cri() else {
        return;
    };
    // `[vm]` is the runv config's last table.
    let mut runv_config = fs::read_to_string(containerd.runv_config()).unwrap();
    runv_config.push_str(&format!("console_log_kib = {CONSOLE_LOG_KIB}\n"));
    fs::write(containerd.runv_config(), runv_config).unwrap();
    let runv = Config::load(&containerd.runv_config()).unwrap();
    let cap = runv.vm.console_log_bytes();
    let mut cri = CriClient::with_pod_images(&containerd).await;
    let log_dir = containerd.dir().join("pod-logs");
    fs::create_dir_all(&log_dir).unwrap();
    let mut config = pod_config("console", &log_dir);
    // As configs/containerd/runv.toml has it, privileged containers get
    // the VM's devices, not the host's.
    let linux = config.linux.as_mut().unwrap();
    linux.security_context = Some(LinuxSandboxSecurityContext {
        privileged: true,
        ..linux.security_context.take().unwrap()
    });
    let pod = run_pod(&mut cri, &config).await;
    // A privileged container may make and write the guest's ttyS0 (the
    // VM's console) on its own /dev.
    let mut flood = app_config("flood");
    flood.args = vec![format!(
        "mknod /dev/ttyS9 c 4 64 && dd if=/dev/zero of=/dev/ttyS9 bs=1k count={FLOOD_KIB} \
         && echo flooded && sleep 3600"
    )];
    flood
        .linux
        .get_or_insert_with(Default::default)
        .security_context = Some(LinuxContainerSecurityContext {
        privileged: true,
        ..Default::default()
    });
    let flood = start_app(&mut cri, &pod, &config, flood).await;
    let logs = log_dir.join("flood.log");
    let began = Instant::now();
    let console = console_log(&runv.run_dir);
    let mut largest = 0;
    loop {
        largest = largest
            .max(file_len(&console))
            .max(file_len(&previous(&console)));
        assert!(largest <= cap, "console log of {largest} bytes");
        if fs::read_to_string(&logs).is_ok_and(|log| log.contains("flooded")) {
            break;
        }
        assert!(
            began.elapsed() < Duration::from_secs(540),
            "the guest did not write {FLOOD_KIB} KiB to its console in 9 minutes (console log \
             {} bytes, previous {} bytes; container log: {:?})",
            file_len(&console),
            file_len(&previous(&console)),
            fs::read_to_string(&logs)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "{FLOOD_KIB} KiB through the console in {:?}; log {} bytes, previous {} bytes",
        began.elapsed(),
        file_len(&console),
        file_len(&previous(&console))
    );
    // The copy may be a pipe's worth behind the guest: once it caught up,
    // the log has rotated, and neither file is past the cap.
    let copied = Instant::now();
    while file_len(&previous(&console)) < cap {
        assert!(
            copied.elapsed() < Duration::from_secs(30),
            "the console log did not rotate: {} bytes, previous {} bytes",
            file_len(&console),
            file_len(&previous(&console))
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(file_len(&previous(&console)), cap);
    assert!(file_len(&console) <= cap);
    let _ = flood;
    remove_pods(&containerd, &mut cri, &[&pod]).await;
    containerd.stop();
}

/// The one console log under `run_dir` (one pod runs).
fn console_log(run_dir: &Path) -> PathBuf {
    let pods: Vec<PathBuf> = fs::read_dir(run_dir.join("pods"))
        .unwrap()
        .flatten()
        .map(|entry| entry.path().join("console.log"))
        .filter(|log| log.exists())
        .collect();
    assert_eq!(pods.len(), 1, "console logs: {pods:?}");
    pods[0].clone()
}

fn previous(log: &Path) -> PathBuf {
    PathBuf::from(format!("{}.1", log.display()))
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).map_or(0, |m| m.len())
}

/// The PIDs and names of `parent`'s child processes.
fn children(parent: u32) -> Vec<(u32, String)> {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // The fields after the name in parentheses: state, then ppid.
            let (name, rest) = stat.split_once(" (")?.1.rsplit_once(") ")?;
            let ppid: u32 = rest.split(' ').nth(1)?.parse().ok()?;
            (ppid == parent).then(|| (pid, name.to_owned()))
        })
        .collect()
}

/// The PID of the one process of `program` serving this containerd.
fn only_pid(containerd: &Containerd, program: &str) -> u32 {
    let processes = pod_processes(containerd, program);
    assert_eq!(processes.len(), 1, "{program}: {processes:?}");
    processes[0].split(':').next().unwrap().parse().unwrap()
}

/// Whether the host has cgroup v2 alone (Some(true)) or v1 hierarchies.
fn cgroup_root() -> Option<bool> {
    let root = Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        Some(true)
    } else {
        root.join("memory").is_dir().then_some(false)
    }
}

/// The directories of the cgroup `relative` that exist, in any hierarchy.
fn cgroup_dirs(relative: &str) -> Vec<PathBuf> {
    let relative = relative.trim_start_matches('/');
    let root = Path::new("/sys/fs/cgroup");
    let mut dirs = vec![root.join(relative)];
    if let Ok(entries) = fs::read_dir(root) {
        dirs.extend(entries.flatten().map(|entry| entry.path().join(relative)));
    }
    dirs.into_iter().filter(|dir| dir.is_dir()).collect()
}

fn read_u64(path: PathBuf) -> u64 {
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("{}: {text:?}", path.display()))
}

fn memory_limit_and_usage(cgroup: &str) -> (u64, u64) {
    let relative = cgroup.trim_start_matches('/');
    match cgroup_root() {
        Some(true) => {
            let dir = Path::new("/sys/fs/cgroup").join(relative);
            (
                read_u64(dir.join("memory.max")),
                read_u64(dir.join("memory.current")),
            )
        }
        _ => {
            let dir = Path::new("/sys/fs/cgroup/memory").join(relative);
            (
                read_u64(dir.join("memory.limit_in_bytes")),
                read_u64(dir.join("memory.usage_in_bytes")),
            )
        }
    }
}

fn cpu_quota(cgroup: &str) -> (u64, u64) {
    let relative = cgroup.trim_start_matches('/');
    match cgroup_root() {
        Some(true) => {
            let text =
                fs::read_to_string(Path::new("/sys/fs/cgroup").join(relative).join("cpu.max"))
                    .unwrap();
            let mut parts = text.split_whitespace().map(|part| part.parse().unwrap());
            (parts.next().unwrap(), parts.next().unwrap())
        }
        _ => {
            let dir = Path::new("/sys/fs/cgroup/cpu").join(relative);
            (
                read_u64(dir.join("cpu.cfs_quota_us")),
                read_u64(dir.join("cpu.cfs_period_us")),
            )
        }
    }
}
