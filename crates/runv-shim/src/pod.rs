//! The pod: the VM this shim holds, its network, its shared directory,
//! its disks and its containers. The VM boots with the first container and powers off when
//! the last one is deleted.

use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hash, Hasher},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use containerd_shim::protos::api::Status;
use runv_agent_client::{AgentClient, ConnectOptions};
use runv_config::Config;
use runv_network::PodNetwork;
use runv_sandbox::PodVm;

use crate::{
    container::Container,
    disks::PodDisks,
    error::{Result, ShimError},
    host_cgroup::{HostCgroup, Limits},
    mounts::SharedDir,
    network,
    port_forward::{self, PortForwarder},
    sizing::{self, PodResources},
};

/// The file in a container's bundle that names its pod's shared
/// directory, for `containerd-shim-runv-v2 delete` after a crash.
pub const SHARED_DIR_MARKER: &str = "runv-shared-dir";

/// How long a power-off waits for the last users of the VM to let go.
const VM_RELEASE_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Pod {
    /// The pod's ID: its sandbox container's (or its only container's).
    id: String,
    vm: Arc<PodVm>,
    vsock: PathBuf,
    shared: SharedDir,
    dir: PathBuf,
    pub containers: HashMap<String, Container>,
    pub disks: PodDisks,
    network: PodNetwork,
    /// Relays PortForward's connections into the VM (a pod with a network
    /// namespace only).
    _port_forward: Option<PortForwarder>,
    /// The host cgroup the VM runs in: left once the VM is gone.
    cgroup: Option<HostCgroup>,
}

impl Pod {
    /// Boots the pod VM of `pod_id` with the runv configuration at
    /// `config_path` (the default file when none), sized for `resources`,
    /// with a NIC for each interface CNI made in the network namespace
    /// `netns` (none: no NIC), in the host cgroup `cgroups_path` (the
    /// sandbox spec's `linux.cgroupsPath`; none: the shim's own).
    /// `bundle`, the first container's, records where the pod's shares are
    /// before the VM boots, so that a shim killed while booting is cleaned
    /// up after (`containerd-shim-runv-v2 delete`).
    /// On error nothing is left: no VM, tap, mount, directory or cgroup.
    pub async fn boot(
        bundle: &Path,
        config_path: Option<&Path>,
        namespace: &str,
        pod_id: &str,
        resources: &PodResources,
        netns: Option<PathBuf>,
        cgroups_path: Option<&str>,
    ) -> Result<Pod> {
        let config = Config::load_or_default(config_path).map_err(|e| {
            ShimError::InvalidArgument(format!(
                "{e} (runv reads {} unless the runtime options name another file: \
                 `ctr run --runtime-config-path`, or ConfigPath in the CRI runtime's options)",
                runv_config::DEFAULT_CONFIG_PATH
            ))
        })?;
        let network = network::setup(netns.clone(), &config).await?;
        let vm_id = vm_id(namespace, pod_id);
        let dir = config.run_dir.join("pods").join(&vm_id);
        let shared =
            SharedDir::create(&dir).and_then(|shared| match mark_bundle(bundle, &shared) {
                Ok(()) => Ok(shared),
                Err(e) => {
                    shared.remove();
                    remove_pod_dir(&dir);
                    Err(e)
                }
            });
        let shared = match shared {
            Ok(shared) => shared,
            Err(e) => {
                network::teardown(network).await;
                return Err(ShimError::Internal(format!(
                    "cannot prepare the pod's shared directory under {} (run_dir in the runv \
                     config): {e}",
                    dir.display()
                )));
            }
        };
        let mut spec = PodVm::spec(&config, &vm_id, dir.join("console.log"));
        let size = sizing::vm_size(&config.vm, resources);
        tracing::info!(
            pod = %resources.pod,
            vcpus = size.vcpus,
            memory_mib = size.memory_mib,
            "pod VM size"
        );
        spec.vcpus = size.vcpus;
        spec.memory_mib = size.memory_mib;
        spec.shared_dir = Some(shared.path().to_owned());
        spec.net_devices = network::net_devices(&network);
        spec.vfio_devices = network.passthrough_functions();
        let connect = ConnectOptions::new(config.vm.agent_timeout());
        // Entered before the VM starts, so that its helpers are born in
        // it; on a failed boot it goes after the VM (end of the arm).
        let cgroup = cgroups_path
            .map(|path| HostCgroup::enter(path, Limits::for_vm(size, resources)))
            .transpose()
            .map_err(ShimError::Internal);
        let booted = match cgroup {
            Ok(cgroup) => match PodVm::boot(&config, spec, &connect).await {
                Ok(vm) => configure_guest_network(vm, &network)
                    .await
                    .map(|vm| (vm, cgroup)),
                Err(e) => Err(ShimError::Internal(format!("cannot boot the pod VM: {e}"))),
            },
            Err(e) => Err(e),
        };
        match booted {
            Ok((vm, cgroup)) => {
                let vm = Arc::new(vm);
                tokio::spawn(log_boot_timeline(vm.clone()));
                let vsock = vm.vsock_socket();
                let port_forward = netns
                    .as_deref()
                    .and_then(|netns| port_forward::start(netns, vsock.clone()));
                Ok(Pod {
                    id: pod_id.to_owned(),
                    vsock,
                    vm,
                    shared,
                    dir,
                    containers: HashMap::new(),
                    disks: PodDisks::default(),
                    network,
                    _port_forward: port_forward,
                    cgroup,
                })
            }
            Err(e) => {
                shared.remove();
                remove_pod_dir(&dir);
                network::teardown(network).await;
                Err(e)
            }
        }
    }

    pub fn agent(&self) -> &AgentClient {
        self.vm.agent()
    }

    pub fn vm(&self) -> Arc<PodVm> {
        self.vm.clone()
    }

    /// The VM's hybrid vsock socket, for stdio streams.
    pub fn vsock(&self) -> &Path {
        &self.vsock
    }

    pub fn shared(&self) -> &SharedDir {
        &self.shared
    }

    /// The guest PID of the sandbox container's init while it runs: the
    /// process whose namespaces CRI names for a container to share (see
    /// `namespaces`).
    pub fn sandbox_init(&self) -> Option<u32> {
        self.containers
            .get(&self.id)
            .filter(|sandbox| sandbox.init.status() == Status::RUNNING)
            .map(|sandbox| sandbox.init.pid)
    }

    pub fn container(&self, id: &str) -> Result<&Container> {
        self.containers
            .get(id)
            .ok_or_else(|| ShimError::NotFound(format!("container {id} not found in this pod")))
    }

    pub fn container_mut(&mut self, id: &str) -> Result<&mut Container> {
        self.containers
            .get_mut(id)
            .ok_or_else(|| ShimError::NotFound(format!("container {id} not found in this pod")))
    }

    /// Records in `bundle` where the pod's shares live.
    pub fn mark_bundle(&self, bundle: &Path) -> Result<()> {
        mark_bundle(bundle, &self.shared)
            .map_err(|e| ShimError::Internal(format!("cannot mark the bundle: {e}")))
    }

    /// Powers the VM off and removes the pod's directory. Every container
    /// must have been released.
    pub async fn power_off(self) {
        let Pod {
            mut vm,
            shared,
            dir,
            containers,
            mut network,
            cgroup,
            _port_forward: port_forward,
            ..
        } = self;
        // No new connections into a VM that is going.
        drop(port_forward);
        // Dropping the processes ends their exit watchers, which hold the VM.
        drop(containers);
        let deadline = tokio::time::Instant::now() + VM_RELEASE_TIMEOUT;
        let vm = loop {
            match Arc::try_unwrap(vm) {
                Ok(vm) => break Some(vm),
                Err(_) if tokio::time::Instant::now() >= deadline => break None,
                Err(shared) => {
                    vm = shared;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        match vm {
            Some(vm) => {
                let report = vm.shutdown().await;
                tracing::info!(exit = %report.exit, forced = report.forced, "pod VM off");
                // Its helpers are reaped: the cgroup is empty but for the shim.
                drop(cgroup);
            }
            // Still in use by a call in flight: the VM helpers die with
            // the shim, which exits next. Its VFs stay with vfio-pci: an
            // unbind would wait for the VM to let go.
            None => {
                tracing::error!("the pod VM is still in use; it ends with the shim");
                network.keep_functions_bound("the pod VM is still in use");
            }
        }
        shared.remove();
        remove_pod_dir(&dir);
        network::teardown(network).await;
    }
}

/// Logs where the pod VM's boot went (in containerd's log, for people and
/// benchmarks), off the pod start's path: the guest's own milestones cost
/// one more agent call.
async fn log_boot_timeline(vm: Arc<PodVm>) {
    let details = match vm.agent().guest_details().await {
        Ok(details) => details,
        Err(e) => {
            tracing::warn!(error = %e, "no guest details for the boot timeline");
            return;
        }
    };
    let timeline = vm.boot_timeline(&details);
    let ms = |d: Duration| (d.as_secs_f64() * 10_000.0).round() / 10.0;
    let guest = timeline.guest.unwrap_or_default();
    tracing::info!(
        accel = %vm.start_info().accel,
        hypervisor_spawn_ms = ms(timeline.hypervisor_spawn),
        kernel_to_init_ms = ms(guest.kernel_to_init),
        init_to_agent_ready_ms = ms(guest.init_to_agent_ready),
        boot_to_agent_answering_ms = ms(timeline.agent_ready),
        "pod VM boot timeline"
    );
}

/// Gives the guest's NICs their addresses, routes and neighbours; a VM
/// whose network cannot be configured is shut down.
async fn configure_guest_network(vm: PodVm, network: &PodNetwork) -> Result<PodVm> {
    if network.is_empty() {
        return Ok(vm);
    }
    let request = network::guest_request(&network.guest_config());
    match vm.agent().configure_network(&request).await {
        Ok(()) => Ok(vm),
        Err(e) => {
            vm.shutdown().await;
            Err(ShimError::Internal(format!(
                "cannot configure the pod VM's network: {e}"
            )))
        }
    }
}

/// Writes [`SHARED_DIR_MARKER`] into `bundle`: the path of `shared`.
fn mark_bundle(bundle: &Path, shared: &SharedDir) -> std::io::Result<()> {
    let marker = bundle.join(SHARED_DIR_MARKER);
    std::fs::write(&marker, shared.path().as_os_str().as_encoded_bytes()).map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot write {}: {e}", marker.display()))
    })
}

fn remove_pod_dir(dir: &Path) {
    if let Err(e) = crate::mounts::remove_unmounted(dir) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot remove the pod directory");
    }
}

/// A VM id unique across namespaces and short enough for socket paths:
/// the pod ID's start, for people, and a hash of namespace and pod ID.
fn vm_id(namespace: &str, pod_id: &str) -> String {
    let mut hasher = DefaultHasher::new();
    (namespace, pod_id).hash(&mut hasher);
    let readable: String = pod_id.chars().take(12).collect();
    format!("{readable}-{:016x}", hasher.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_ids_are_short_and_per_namespace() {
        let long = "a".repeat(64);
        assert_eq!(vm_id("default", &long).len(), 12 + 1 + 16);
        assert_ne!(vm_id("default", "c1"), vm_id("k8s.io", "c1"));
        assert_eq!(vm_id("default", "c1"), vm_id("default", "c1"));
    }
}
