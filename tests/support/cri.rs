//! containerd's CRI plugin for tests: its configuration (the runtime
//! handler `runv`, a local pause image, the test's own CNI config), the pause
//! image built from busybox (no registry is reachable), and a CRI v1
//! client over containerd's socket.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::{
    image_service_client::ImageServiceClient, runtime_service_client::RuntimeServiceClient,
    ContainerConfig, ContainerMetadata, ContainerState, ContainerStatus, ContainerStatusRequest,
    CreateContainerRequest, DnsConfig, ExecSyncRequest, ExecSyncResponse, ImageSpec,
    LinuxPodSandboxConfig, LinuxSandboxSecurityContext, NamespaceMode, NamespaceOption,
    PodSandboxConfig, PodSandboxMetadata, RemoveContainerRequest, RemovePodSandboxRequest,
    RunPodSandboxRequest, StartContainerRequest, StatusRequest, StopContainerRequest,
    StopPodSandboxRequest,
};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::{
    cni::wait_network_ready,
    containerd::{build_busybox_based_image, mounts_under, Containerd, BUSYBOX_IMAGE},
    processes_mentioning,
};

/// The containerd namespace the CRI plugin keeps its containers in.
pub const NAMESPACE: &str = "k8s.io";

/// The runtime handler that selects runv (a RuntimeClass's `handler`).
pub const RUNTIME_HANDLER: &str = "runv";

/// The host programs runv runs for a pod: the shim, and on the qemu
/// hypervisor QEMU and its helpers ([`crate::vm_helper_programs`]).
pub const SHIM: &str = "containerd-shim-runv-v2";
pub const VIRTIOFSD: &str = "virtiofsd";

/// The host process that runs a pod's VM: QEMU, or on the builtin
/// hypervisor the shim itself.
pub fn vm_process() -> &'static str {
    match crate::test_hypervisor() {
        runv_config::HypervisorKind::Qemu => "qemu-system-x86_64",
        runv_config::HypervisorKind::Builtin => SHIM,
    }
}

/// A nameserver only the tests' pods use, to recognise CRI's resolv.conf.
pub const POD_NAMESERVER: &str = "192.0.2.53";

/// The sandbox ("pause") image, built locally.
pub const PAUSE_IMAGE: &str = "docker.io/runv/pause:test";

/// The CRI plugin's part of a containerd config (version 2) whose
/// directory is `root`: the handler `runv` with the runv config
/// `root/runv.toml` as ConfigPath, the local pause image, and CNI config
/// read from `root/cni` (the test's own network, [`crate::cni`]) rather
/// than the host's /etc/cni. A `runtimes` table replaces containerd's
/// default one, so runc (the default handler) is declared too. The stream
/// server (exec, attach, port-forward
/// URLs) listens on a free port of the loopback. OOM score adjustments are
/// kept at or above containerd's own: without CAP_SYS_RESOURCE (a
/// sandboxed host) runc cannot give a pod's sandbox CRI's -998.
pub fn plugin_config(root: &Path) -> String {
    let cri = r#"[plugins."io.containerd.grpc.v1.cri"]"#;
    let runtimes = r#"[plugins."io.containerd.grpc.v1.cri".containerd.runtimes"#;
    format!(
        "{cri}\n  sandbox_image = \"{PAUSE_IMAGE}\"\n  \
         stream_server_address = \"127.0.0.1\"\n  stream_server_port = \"0\"\n  \
         enable_selinux = false\n  restrict_oom_score_adj = true\n\
         {cri_cni}\n  bin_dir = \"/usr/lib/cni\"\n  conf_dir = \"{root}/cni\"\n\
         {runtimes}.runc]\n  runtime_type = \"io.containerd.runc.v2\"\n\
         {runtimes}.{RUNTIME_HANDLER}]\n  runtime_type = \"io.containerd.runv.v2\"\n  \
         privileged_without_host_devices = true\n\
         {runtimes}.{RUNTIME_HANDLER}.options]\n  ConfigPath = \"{root}/runv.toml\"\n",
        cri_cni = r#"[plugins."io.containerd.grpc.v1.cri".cni]"#,
        root = root.display(),
    )
}

/// Builds the pause image: busybox whose shell sleeps until SIGTERM or
/// SIGINT, as the real pause does.
pub fn build_pause_image(dir: &Path) -> PathBuf {
    build_busybox_based_image(
        dir,
        PAUSE_IMAGE,
        &[
            "/bin/sh",
            "-c",
            "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done",
        ],
        &[],
    )
}

/// CRI's runtime and image services on containerd's socket; a clone
/// shares the connection, for calls made at the same time.
#[derive(Clone)]
pub struct CriClient {
    pub runtime: RuntimeServiceClient<Channel>,
    pub images: ImageServiceClient<Channel>,
}

impl CriClient {
    pub async fn connect(socket: &Path) -> CriClient {
        let socket = socket.to_owned();
        // The URI is a placeholder: every connection goes to the socket.
        let channel = Endpoint::from_static("http://[::]:0")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(socket).await?,
                    ))
                }
            }))
            .await
            .expect("connecting to containerd's CRI socket");
        CriClient {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        }
    }

    /// Connects to a containerd that has just started again, once its CRI
    /// plugin serves (it answers "server is not initialized yet" while it
    /// loads its state, after containerd itself answers).
    pub async fn reconnect(socket: &Path) -> CriClient {
        let mut cri = CriClient::connect(socket).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        while let Err(e) = cri.runtime.status(StatusRequest::default()).await {
            assert!(Instant::now() < deadline, "CRI does not serve: {e}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        cri
    }

    /// Imports what pods run (busybox and a pause image) into
    /// `containerd`, then connects to its CRI socket.
    pub async fn with_pod_images(containerd: &Containerd) -> CriClient {
        containerd.import_busybox();
        containerd.import_image(&build_pause_image(containerd.dir()));
        let mut cri = CriClient::connect(&containerd.dir().join("containerd.sock")).await;
        wait_network_ready(&mut cri).await;
        cri
    }
}

/// Stops and removes the pods, then requires that no shim, VM or helper
/// of this containerd runs and nothing stays mounted.
pub async fn remove_pods(containerd: &Containerd, cri: &mut CriClient, pod_ids: &[&str]) {
    for pod_id in pod_ids {
        cri.runtime
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod_id.to_string(),
            })
            .await
            .expect("StopPodSandbox");
        cri.runtime
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod_id.to_string(),
            })
            .await
            .expect("RemovePodSandbox");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let runv_processes = || {
        [SHIM, vm_process(), VIRTIOFSD]
            .iter()
            .flat_map(|program| pod_processes(containerd, program))
            .collect::<Vec<_>>()
    };
    while !runv_processes().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(runv_processes(), Vec::<String>::new(), "left after removal");
    assert_eq!(mounts_under(containerd.dir()), Vec::<String>::new());
}

/// Runs a pod sandbox with the runv handler; returns its ID.
pub async fn run_pod(cri: &mut CriClient, config: &PodSandboxConfig) -> String {
    try_run_pod(cri, config).await.expect("RunPodSandbox")
}

/// RunPodSandbox with the runv handler, for tests of how it fails.
pub async fn try_run_pod(
    cri: &mut CriClient,
    config: &PodSandboxConfig,
) -> Result<String, tonic::Status> {
    let reply = cri
        .runtime
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: RUNTIME_HANDLER.into(),
        })
        .await?;
    Ok(reply.into_inner().pod_sandbox_id)
}

/// Stops (5 s grace) and removes a container, as the kubelet does.
pub async fn remove_container(cri: &mut CriClient, id: &str) {
    cri.runtime
        .stop_container(StopContainerRequest {
            container_id: id.to_owned(),
            timeout: 5,
        })
        .await
        .expect("StopContainer");
    cri.runtime
        .remove_container(RemoveContainerRequest {
            container_id: id.to_owned(),
        })
        .await
        .expect("RemoveContainer");
}

/// The name in a container config's metadata, for messages.
fn container_name(config: &ContainerConfig) -> String {
    config
        .metadata
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default()
}

/// Creates and starts an app container in the pod; returns its ID.
pub async fn start_app(
    cri: &mut CriClient,
    pod_id: &str,
    pod_config: &PodSandboxConfig,
    config: ContainerConfig,
) -> String {
    let name = container_name(&config);
    let id = create_app(cri, pod_id, pod_config, config).await;
    cri.runtime
        .start_container(StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("StartContainer {name}: {e}"));
    id
}

/// Creates an app container in the pod (CRI's create: containerd's
/// container, not yet the task that runs in the VM); returns its ID.
pub async fn create_app(
    cri: &mut CriClient,
    pod_id: &str,
    pod_config: &PodSandboxConfig,
    config: ContainerConfig,
) -> String {
    let name = container_name(&config);
    cri.runtime
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod_id.into(),
            config: Some(config),
            sandbox_config: Some(pod_config.clone()),
        })
        .await
        .unwrap_or_else(|e| panic!("CreateContainer {name}: {e}"))
        .into_inner()
        .container_id
}

/// A pod named `name` whose logs go to `log_dir`, on the CNI network of
/// its containerd ([`crate::cni`]), with its own PID namespace and a
/// resolv.conf naming [`POD_NAMESERVER`].
pub fn pod_config(name: &str, log_dir: &Path) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}-{}", std::process::id()),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: log_dir.to_string_lossy().into_owned(),
        dns_config: Some(DnsConfig {
            servers: vec![POD_NAMESERVER.into()],
            searches: vec!["runv.test".into()],
            options: vec![],
        }),
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: "/kubepods/besteffort/pod-runv-test".into(),
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Pod as i32,
                    pid: NamespaceMode::Container as i32,
                    ipc: NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        labels: HashMap::from([("app".into(), "runv-test".into())]),
        ..Default::default()
    }
}

/// A long-running busybox container that says it started on stdout.
pub fn app_config(name: &str) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: BUSYBOX_IMAGE.into(),
            ..Default::default()
        }),
        command: vec!["sh".into(), "-c".into()],
        args: vec![format!(
            "echo started {name}; trap 'exit 0' TERM; while :; do sleep 3600 & wait $!; done"
        )],
        log_path: format!("{name}.log"),
        ..Default::default()
    }
}

/// Runs `cmd` in container `id` through CRI's ExecSync (60 s at most).
pub async fn try_exec_sync(
    cri: &mut CriClient,
    id: &str,
    cmd: &[&str],
) -> Result<ExecSyncResponse, tonic::Status> {
    cri.runtime
        .exec_sync(ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|arg| arg.to_string()).collect(),
            timeout: 60,
        })
        .await
        .map(tonic::Response::into_inner)
}

/// [`try_exec_sync`] that must succeed; prints what the command printed.
pub async fn exec_sync(cri: &mut CriClient, id: &str, cmd: &[&str]) -> ExecSyncResponse {
    let response = try_exec_sync(cri, id, cmd)
        .await
        .unwrap_or_else(|e| panic!("ExecSync {cmd:?} in {id}: {e}"));
    eprintln!(
        "ExecSync {cmd:?} in {id}: exit {}, stdout {:?}, stderr {:?}",
        response.exit_code,
        String::from_utf8_lossy(&response.stdout),
        String::from_utf8_lossy(&response.stderr)
    );
    response
}

/// The host processes of `program` that serve this containerd's pods.
pub fn pod_processes(containerd: &Containerd, program: &str) -> Vec<String> {
    processes_mentioning(containerd.dir())
        .into_iter()
        .filter(|process| {
            let command = process.split_once(": ").map_or("", |(_, command)| command);
            let argv0 = command.split(' ').next().unwrap_or_default();
            Path::new(argv0)
                .file_name()
                .is_some_and(|name| name == program)
        })
        .collect()
}

/// Waits (at most 120 s) for container `id` to exit, as containerd learns
/// from the shim's exit event or from the shim's death; its status.
pub async fn wait_exited(cri: &mut CriClient, id: &str) -> ContainerStatus {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = cri
            .runtime
            .container_status(ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            })
            .await
            .expect("ContainerStatus")
            .into_inner()
            .status
            .expect("a status");
        if status.state == ContainerState::ContainerExited as i32 {
            return status;
        }
        assert!(Instant::now() < deadline, "{id} did not exit: {status:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
