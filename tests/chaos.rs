//! Chaos: a CRI pod loses a part while it works — the shim killed at each
//! stage of a pod's life, a VM helper killed, the guest kernel panicking,
//! containerd restarted, runv's state file system full, a container
//! eating the guest's memory. Each case checks that containerd learns
//! what ended (the containers' exit), that the pod can still be removed,
//! that the host is back to its footprint from before the pod
//! (tests/support/leaks.rs), and that the next pod starts and works.
//! docs/reliability.md has the table.

// A test holds the lock on host-wide footprints (leaks::exclusive) for
// its whole run, awaits included, so that the binary's tests run one at a
// time: blocking another test's thread on it is the point.
#![allow(clippy::await_holding_lock)]

use std::{
    fs,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use k8s_cri::v1::{
    Capability, ContainerState, ExecSyncRequest, LinuxContainerConfig, LinuxContainerResources,
    LinuxContainerSecurityContext, ListContainersRequest, ListPodSandboxRequest, Mount,
    PodSandboxConfig, PodSandboxState, RemoveContainerRequest, RemovePodSandboxRequest,
    StartContainerRequest, StopPodSandboxRequest,
};
use runv_config::HypervisorKind;
use runv_tests::{
    containerd::Containerd,
    cri::{
        app_config, create_app, exec_sync, pod_config, pod_processes, remove_pods, run_pod,
        start_app, try_run_pod, wait_exited, CriClient, SHIM, VIRTIOFSD,
    },
    leaks::{self, Footprint},
    only_on,
};

/// containerd with CRI and the pod images, the host's footprint before any
/// pod, and the test's hold on host-wide checks.
struct Bed {
    containerd: Containerd,
    cri: CriClient,
    baseline: Footprint,
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl Bed {
    async fn start() -> Option<Bed> {
        let serial = leaks::exclusive();
        let containerd = Containerd::start_with_cri()?;
        let cri = CriClient::with_pod_images(&containerd).await;
        let baseline = Footprint::take(&containerd);
        Some(Bed {
            containerd,
            cri,
            baseline,
            _serial: serial,
        })
    }

    fn pod_config(&self, name: &str) -> PodSandboxConfig {
        let log_dir = self.containerd.dir().join("pod-logs");
        fs::create_dir_all(&log_dir).unwrap();
        pod_config(name, &log_dir)
    }

    /// A pod with one long-running app container; their IDs.
    async fn pod_with_app(&mut self, name: &str) -> (String, String, PodSandboxConfig) {
        let config = self.pod_config(name);
        let pod = run_pod(&mut self.cri, &config).await;
        let app = start_app(&mut self.cri, &pod, &config, app_config("app")).await;
        (pod, app, config)
    }

    /// The aftermath every case ends with: every pod is stopped and
    /// removed through CRI (as the kubelet does after a failure), the host
    /// is back to its footprint from before the first pod, and a new pod
    /// starts, runs an exec, and goes as cleanly.
    async fn recovers(mut self) {
        let pods = self.pods().await;
        for pod in &pods {
            self.cri
                .runtime
                .stop_pod_sandbox(StopPodSandboxRequest {
                    pod_sandbox_id: pod.id.clone(),
                })
                .await
                .unwrap_or_else(|e| panic!("StopPodSandbox {}: {e}", pod.id));
            self.cri
                .runtime
                .remove_pod_sandbox(RemovePodSandboxRequest {
                    pod_sandbox_id: pod.id.clone(),
                })
                .await
                .unwrap_or_else(|e| panic!("RemovePodSandbox {}: {e}", pod.id));
        }
        Footprint::assert_back_to(&self.containerd, &self.baseline);

        let (pod, app, _) = self.pod_with_app("next").await;
        let hello = exec_sync(&mut self.cri, &app, &["echo", "next pod"]).await;
        assert_eq!(String::from_utf8_lossy(&hello.stdout), "next pod\n");
        remove_pods(&self.containerd, &mut self.cri, &[&pod]).await;
        Footprint::assert_back_to(&self.containerd, &self.baseline);
        self.containerd.stop();
    }

    /// The pods CRI lists.
    async fn pods(&mut self) -> Vec<k8s_cri::v1::PodSandbox> {
        self.cri
            .runtime
            .list_pod_sandbox(ListPodSandboxRequest::default())
            .await
            .expect("ListPodSandbox")
            .into_inner()
            .items
    }

    /// SIGKILLs the one host process of `program` that serves the pods;
    /// its PID.
    fn kill_one(&self, program: &str) -> u32 {
        let found = pod_processes(&self.containerd, program);
        assert_eq!(found.len(), 1, "one {program}: {found:?}");
        let pid: u32 = found[0].split(':').next().unwrap().parse().unwrap();
        // SAFETY: kill only signals the pod's process this test found.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        println!("chaos: killed {program} ({pid})");
        pid
    }

    /// Waits until the pod's sandbox is no longer ready (containerd saw
    /// its task end).
    async fn wait_not_ready(&mut self, pod: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let pods = self.pods().await;
            let state = pods.iter().find(|p| p.id == pod).map(|p| p.state);
            if state != Some(PodSandboxState::SandboxReady as i32) {
                return;
            }
            assert!(Instant::now() < deadline, "pod {pod} stays ready");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The shim SIGKILLed while RunPodSandbox boots the VM: RunPodSandbox
/// fails instead of hanging, and nothing of the half-made pod stays.
#[tokio::test(flavor = "multi_thread")]
async fn shim_killed_while_the_pod_boots() {
    let Some(bed) = Bed::start().await else {
        return;
    };
    let config = bed.pod_config("booting");
    let mut cri = bed.cri.clone();
    let run = tokio::spawn(async move { try_run_pod(&mut cri, &config).await });
    // The pod's run directory appears when the shim starts making the VM.
    let pods_dir = bed.containerd.dir().join("run/pods");
    let deadline = Instant::now() + Duration::from_secs(120);
    while fs::read_dir(&pods_dir).map_or(true, |mut dir| dir.next().is_none()) {
        assert!(Instant::now() < deadline, "the shim never began a VM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bed.kill_one(SHIM);
    let result = run.await.unwrap();
    println!("RunPodSandbox with its shim killed: {result:?}");
    assert!(result.is_err(), "RunPodSandbox succeeded without its shim");
    bed.recovers().await;
}

/// The shim SIGKILLed between CRI's CreateContainer and StartContainer:
/// the start fails, the sandbox is reported gone, and the container and
/// pod can be removed.
#[tokio::test(flavor = "multi_thread")]
async fn shim_killed_between_create_and_start() {
    let Some(mut bed) = Bed::start().await else {
        return;
    };
    let config = bed.pod_config("creating");
    let pod = run_pod(&mut bed.cri, &config).await;
    let app = create_app(&mut bed.cri, &pod, &config, app_config("app")).await;
    bed.kill_one(SHIM);
    bed.wait_not_ready(&pod).await;
    let started = bed
        .cri
        .runtime
        .start_container(StartContainerRequest {
            container_id: app.clone(),
        })
        .await;
    println!("StartContainer with its shim killed: {started:?}");
    assert!(started.is_err(), "a container started in a dead pod");
    bed.cri
        .runtime
        .remove_container(RemoveContainerRequest { container_id: app })
        .await
        .expect("RemoveContainer");
    bed.recovers().await;
}

/// The shim SIGKILLed while an exec runs: the exec returns (an error or a
/// failed exit, not a hang), and containerd reports the container exited.
#[tokio::test(flavor = "multi_thread")]
async fn shim_killed_during_exec() {
    let Some(mut bed) = Bed::start().await else {
        return;
    };
    let (pod, app, _) = bed.pod_with_app("exec").await;
    let mut runtime = bed.cri.runtime.clone();
    let exec_app = app.clone();
    let exec = tokio::spawn(async move {
        runtime
            .exec_sync(ExecSyncRequest {
                container_id: exec_app,
                cmd: vec!["sh".into(), "-c".into(), "echo running; sleep 600".into()],
                timeout: 0,
            })
            .await
    });
    // Wait until the exec's process runs in the container.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ps = exec_sync(&mut bed.cri, &app, &["ps", "-o", "args"]).await;
        if String::from_utf8_lossy(&ps.stdout).contains("sleep 600") {
            break;
        }
        assert!(Instant::now() < deadline, "the exec never started");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bed.kill_one(SHIM);
    let ended = tokio::time::timeout(Duration::from_secs(60), exec)
        .await
        .expect("the exec hangs after its shim died")
        .unwrap();
    println!("ExecSync with its shim killed: {ended:?}");
    assert!(
        ended.map_or(true, |reply| reply.into_inner().exit_code != 0),
        "the exec reported success"
    );
    assert_eq!(
        wait_exited(&mut bed.cri, &app).await.state,
        ContainerState::ContainerExited as i32
    );
    bed.wait_not_ready(&pod).await;
    bed.recovers().await;
}

/// The shim SIGKILLed while StopPodSandbox stops the pod: stopping again
/// and removing succeed.
#[tokio::test(flavor = "multi_thread")]
async fn shim_killed_during_delete() {
    let Some(mut bed) = Bed::start().await else {
        return;
    };
    let (pod, _, _) = bed.pod_with_app("deleting").await;
    let mut runtime = bed.cri.runtime.clone();
    let stop_pod = pod.clone();
    let stop = tokio::spawn(async move {
        runtime
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: stop_pod,
            })
            .await
    });
    // StopPodSandbox kills the app and deletes its task, then the
    // sandbox's, which powers the VM off: kill the shim on the way.
    tokio::time::sleep(Duration::from_millis(50)).await;
    if pod_processes(&bed.containerd, SHIM).len() == 1 {
        bed.kill_one(SHIM);
    } else {
        println!("chaos: the pod was stopped before its shim could be killed");
    }
    println!(
        "StopPodSandbox with its shim killed: {:?}",
        stop.await.unwrap()
    );
    bed.recovers().await;
}

/// Each of QEMU's helper processes, and QEMU itself, SIGKILLed under a
/// pod with a shared volume: the VM ends, containerd reports the app
/// exited and the sandbox not ready, and the pod can be removed.
#[tokio::test(flavor = "multi_thread")]
async fn vm_helpers_killed() {
    if !only_on(HypervisorKind::Qemu, "killing VM helper processes") {
        return;
    }
    let Some(mut bed) = Bed::start().await else {
        return;
    };
    let shared = bed.containerd.dir().join("shared-volume");
    fs::create_dir_all(&shared).unwrap();
    for program in ["qemu-system-x86_64", "vhost-device-vsock", VIRTIOFSD] {
        let config = bed.pod_config(&format!("helper-{program}"));
        let pod = run_pod(&mut bed.cri, &config).await;
        let mut app = app_config("app");
        app.mounts = vec![Mount {
            container_path: "/shared".into(),
            host_path: shared.to_string_lossy().into_owned(),
            ..Default::default()
        }];
        let app = start_app(&mut bed.cri, &pod, &config, app).await;
        bed.kill_one(program);
        let status = wait_exited(&mut bed.cri, &app).await;
        println!("app after {program} was killed: exit {}", status.exit_code);
        bed.wait_not_ready(&pod).await;
        remove_pods(&bed.containerd, &mut bed.cri, &[&pod]).await;
        Footprint::assert_back_to(&bed.containerd, &bed.baseline);
    }
    bed.recovers().await;
}

/// A privileged container of the pod makes the guest kernel panic (its
/// own procfs lets it set vm.panic_on_oom, then it eats the guest's
/// memory): the VM ends, containerd reports the containers exited, and
/// the pod goes as usual.
#[tokio::test(flavor = "multi_thread")]
async fn guest_kernel_panic_ends_the_pod() {
    let Some(mut bed) = Bed::start().await else {
        return;
    };
    let config = bed.pod_config("panic");
    let pod = run_pod(&mut bed.cri, &config).await;
    let keeper = start_app(&mut bed.cri, &pod, &config, app_config("keeper")).await;
    let mut panicker = app_config("panicker");
    panicker.args = vec!["mkdir /tmp/proc && mount -t proc proc /tmp/proc && \
                          echo 2 > /tmp/proc/sys/vm/panic_on_oom && echo armed && \
                          x=$(head -c 1073741824 /dev/zero | tr '\\000' a)"
        .into()];
    panicker.linux = Some(LinuxContainerConfig {
        security_context: Some(LinuxContainerSecurityContext {
            capabilities: Some(Capability {
                add_capabilities: vec!["SYS_ADMIN".into()],
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    let panicker = start_app(&mut bed.cri, &pod, &config, panicker).await;
    for id in [&panicker, &keeper] {
        let status = wait_exited(&mut bed.cri, id).await;
        println!("{id} after the guest panicked: exit {}", status.exit_code);
    }
    bed.wait_not_ready(&pod).await;
    bed.recovers().await;
}

/// containerd restarted (SIGTERM, then SIGKILL as a crash) while a pod
/// runs: the shim and VM live on, and after each restart the pod and its
/// container are listed, answer an exec, and can be removed.
#[tokio::test(flavor = "multi_thread")]
async fn containerd_restarted_while_pods_run() {
    let Some(mut bed) = Bed::start().await else {
        return;
    };
    let (pod, app, _) = bed.pod_with_app("restart").await;
    let shim = pod_processes(&bed.containerd, SHIM);
    for signal in [libc::SIGTERM, libc::SIGKILL] {
        bed.containerd.restart(signal);
        bed.cri = CriClient::reconnect(&bed.containerd.dir().join("containerd.sock")).await;
        assert_eq!(
            pod_processes(&bed.containerd, SHIM),
            shim,
            "the shim lives on"
        );
        let pods = bed.pods().await;
        assert!(
            pods.iter()
                .any(|p| p.id == pod && p.state == PodSandboxState::SandboxReady as i32),
            "the pod is ready after containerd's restart (signal {signal}): {pods:?}"
        );
        let containers = bed
            .cri
            .runtime
            .list_containers(ListContainersRequest::default())
            .await
            .expect("ListContainers")
            .into_inner()
            .containers;
        assert!(
            containers
                .iter()
                .any(|c| c.id == app && c.state == ContainerState::ContainerRunning as i32),
            "the container runs after containerd's restart (signal {signal}): {containers:?}"
        );
        let hello = exec_sync(&mut bed.cri, &app, &["echo", "still here"]).await;
        assert_eq!(String::from_utf8_lossy(&hello.stdout), "still here\n");
    }
    bed.recovers().await;
}

/// runv's state file system (its run_dir, a tmpfs here) full during
/// RunPodSandbox: the pod fails with an error that says so, nothing is
/// left, and once there is room the next pod starts.
#[tokio::test(flavor = "multi_thread")]
async fn state_file_system_full_during_create() {
    let Some(mut bed) = Bed::start().await else {
        return;
    };
    let run_dir = bed.containerd.dir().join("run");
    fs::create_dir_all(&run_dir).unwrap();
    let full = FullFileSystem::mount(&run_dir);
    let config = bed.pod_config("full");
    let refused = try_run_pod(&mut bed.cri, &config)
        .await
        .expect_err("a pod started on a full state file system");
    println!("RunPodSandbox on a full state file system: {refused}");
    assert!(
        refused.message().contains("No space left on device"),
        "the error names the cause: {refused}"
    );
    drop(full);
    bed.recovers().await;
}

/// A tmpfs mounted over `dir` and filled to its last block and inode;
/// unmounted when dropped.
struct FullFileSystem<'a> {
    dir: &'a Path,
}

impl FullFileSystem<'_> {
    fn mount(dir: &Path) -> FullFileSystem<'_> {
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k,nr_inodes=32", "runv-full"])
            .arg(dir)
            .status()
            .expect("running mount");
        assert!(status.success(), "mounting a tmpfs on {}", dir.display());
        let filler = dir.join("filler");
        let _ = fs::write(&filler, vec![0u8; 128 * 1024]);
        for n in 0.. {
            if fs::write(dir.join(format!("inode-{n}")), "").is_err() {
                break;
            }
        }
        FullFileSystem { dir }
    }
}

impl Drop for FullFileSystem<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir).status();
    }
}

/// A container that eats all of the guest's memory (no limit of its own)
/// is killed by the guest's OOM killer and reported OOMKilled; the agent
/// (the guest's PID 1, which the OOM killer never picks) and the pod's
/// other container keep working.
#[tokio::test(flavor = "multi_thread")]
async fn container_eating_guest_memory_is_oom_killed() {
    let Some(mut bed) = Bed::start().await else {
        return;
    };
    let (pod, keeper, config) = bed.pod_with_app("memory").await;
    let mut eater = app_config("eater");
    eater.args = vec!["echo eating; x=$(head -c 4294967296 /dev/zero | tr '\\000' a)".into()];
    eater.linux = Some(LinuxContainerConfig {
        resources: Some(LinuxContainerResources::default()),
        ..Default::default()
    });
    let eater = start_app(&mut bed.cri, &pod, &config, eater).await;
    let status = wait_exited(&mut bed.cri, &eater).await;
    println!(
        "eater: exit {}, reason {:?}",
        status.exit_code, status.reason
    );
    assert_eq!(status.reason, "OOMKilled", "{status:?}");
    let alive = exec_sync(&mut bed.cri, &keeper, &["echo", "still here"]).await;
    assert_eq!(String::from_utf8_lossy(&alive.stdout), "still here\n");
    bed.recovers().await;
}
