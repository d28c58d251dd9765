//! A pod VM as the rest of runv sees it: a hypervisor running the guest and
//! a checked connection to the agent inside. Booting either yields both or
//! leaves nothing behind; shutting down asks the guest first and kills only
//! when it does not comply.

mod timeline;

use std::{
    future::Future,
    path::{Path, PathBuf},
    task::Poll,
    time::{Duration, Instant},
};

use runv_agent_client::{AgentClient, AgentError, ConnectOptions, ReadyListener};
use runv_config::Config;
use runv_hypervisor::{
    process, ConsoleCapture, Hypervisor, HypervisorError, StartInfo, VmExit, VmSpec,
};
use runv_protocol::{agent::GuestDetails, GUEST_SHARED_DIR, SHARED_FS_TAG};

pub use runv_hypervisor::{guest_pci_address, vfio_support, BlockDevice, NetDevice};
pub use timeline::{BootTimeline, GuestBootTimes};

/// Console lines quoted when the guest fails to come up.
const CONSOLE_TAIL_LINES: usize = 30;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error("{source}\nlast guest console lines ({console}):\n{console_tail}")]
    Agent {
        source: AgentError,
        console: PathBuf,
        console_tail: String,
    },
    #[error(
        "the VM ended before its agent answered: {exit}\nlast guest console lines ({console}):\n\
         {console_tail}"
    )]
    EndedDuringBoot {
        exit: VmExit,
        console: PathBuf,
        console_tail: String,
    },
    /// The guest did not take a block device the host attached; the host
    /// has detached it again.
    #[error("the guest did not take {path} (virtio-mmio slot {slot}): {reason}")]
    BlockNotTaken {
        path: PathBuf,
        slot: u32,
        reason: String,
    },
    /// The guest did not let go of a block device; the host keeps it
    /// attached, as the guest may still use it.
    #[error("the guest did not let go of the block device in virtio-mmio slot {slot}: {source}")]
    BlockNotReleased { slot: u32, source: AgentError },
}

/// A block device plugged into a running pod VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluggedBlock {
    /// The virtio-mmio slot it is in: what `unplug_block` takes.
    pub slot: u32,
    /// Its device node in the guest, e.g. "/dev/vdb".
    pub guest_device: String,
    /// That node's device number (major, minor) in the guest.
    pub guest_number: (u32, u32),
}

/// Ends a VM whose boot failed, and returns the last lines of its console
/// for the error.
async fn abandon(hypervisor: &mut dyn Hypervisor, console: &Path) -> String {
    hypervisor.stop(Duration::ZERO).await;
    // The log is made at the guest's first byte.
    if !console.exists() {
        return "(none: the guest wrote nothing to its console)".into();
    }
    process::tail(console, CONSOLE_TAIL_LINES)
}

/// Unbinds each of `slots` in the guest, all at once: each unbind tears
/// down a disk in the guest, and one after the other they take a quarter
/// of a second under TCG.
async fn unbind_standby_slots(agent: &AgentClient, slots: &[u32]) -> Result<(), AgentError> {
    if slots.is_empty() {
        return Ok(());
    }
    let began = Instant::now();
    let mut pending: Vec<_> = slots
        .iter()
        .map(|&slot| Box::pin(agent.unplug_virtio_mmio(slot)))
        .collect();
    let mut first_error = None;
    std::future::poll_fn(|cx| {
        pending.retain_mut(|unbind| match unbind.as_mut().poll(cx) {
            Poll::Ready(result) => {
                if let Err(e) = result {
                    first_error.get_or_insert(e);
                }
                false
            }
            Poll::Pending => true,
        });
        if pending.is_empty() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    if let Some(e) = first_error {
        return Err(e);
    }
    tracing::debug!(?slots, took = ?began.elapsed(), "standby slots unbound in the guest");
    Ok(())
}

/// How a shutdown went.
#[derive(Debug, Clone)]
pub struct ShutdownReport {
    pub exit: VmExit,
    pub duration: Duration,
    /// The guest did not power off in time and was killed.
    pub forced: bool,
}

/// A running pod VM with its agent.
pub struct PodVm {
    hypervisor: Box<dyn Hypervisor>,
    agent: AgentClient,
    start: StartInfo,
    boot_started: Instant,
    agent_ready: Duration,
    first_rpc: Duration,
    shutdown_timeout: Duration,
    /// The spec's shared directory is mounted in the guest.
    shared: bool,
    /// Copies the console into its capped log for the VM's life.
    _console: ConsoleCapture,
}

impl PodVm {
    /// The guest kernel command line parameters runv adds for `config`.
    pub fn kernel_params(config: &Config) -> String {
        let mut params = vec![format!("runv.log_level={}", config.log_level)];
        if !matches!(config.log_level.as_str(), "debug" | "trace") {
            params.push("quiet".into());
        }
        if !config.vm.kernel_params.is_empty() {
            params.push(config.vm.kernel_params.clone());
        }
        params.join(" ")
    }

    /// The VM spec for `id` from `config`, with the console going to `console_log`.
    pub fn spec(config: &Config, id: &str, console_log: PathBuf) -> VmSpec {
        VmSpec {
            id: id.to_owned(),
            kernel: config.vm.kernel.clone(),
            initramfs: config.vm.initramfs.clone(),
            kernel_params: Self::kernel_params(config),
            vcpus: config.vm.vcpus,
            memory_mib: config.vm.memory_mib,
            run_dir: config.run_dir.clone(),
            console_log,
            shared_dir: None,
            net_devices: Vec::new(),
            vfio_devices: Vec::new(),
        }
    }

    /// Boots `spec` on the configured hypervisor and connects to its agent.
    pub async fn boot(
        config: &Config,
        spec: VmSpec,
        connect: &ConnectOptions,
    ) -> Result<PodVm, SandboxError> {
        let boot_started = Instant::now();
        let console = spec.console_log.clone();
        let shared = spec.shared_dir.is_some();
        // The hypervisor writes into a pipe that runv copies into the
        // log, capped: the guest does not decide how much disk it fills.
        let capture =
            ConsoleCapture::start(&console, config.vm.console_log_bytes()).map_err(|source| {
                HypervisorError::Io {
                    context: format!(
                        "cannot capture the guest console into {}",
                        console.display()
                    ),
                    source,
                }
            })?;
        let mut spec = spec;
        spec.console_log = capture.path().to_owned();
        let mut hypervisor = runv_hypervisor::create(config, spec);
        let start = hypervisor.start().await?;
        let mut exit = hypervisor
            .exit_watch()
            .expect("a started hypervisor has an exit watch");
        let socket = hypervisor.vsock_socket();
        let connecting = async {
            let ready = ReadyListener::bind(&socket)?;
            AgentClient::connect(&socket, ready, connect).await
        };
        let connected = tokio::select! {
            connected = connecting => connected,
            exit = exit.wait() => {
                return Err(SandboxError::EndedDuringBoot {
                    exit,
                    console_tail: abandon(hypervisor.as_mut(), &console).await,
                    console,
                });
            }
        };
        // The shared directory is part of a booted VM: the shim puts
        // container root file systems there.
        let ready = match connected {
            Ok((agent, times)) if shared => agent
                .mount_virtio_fs(SHARED_FS_TAG, GUEST_SHARED_DIR)
                .await
                .map(|()| (agent, times)),
            other => other,
        };
        // Slots whose placeholder the guest bound at boot are unbound, so
        // that binding one after the host has filled it probes afresh.
        let ready = match ready {
            Ok((agent, times)) => unbind_standby_slots(&agent, &hypervisor.standby_slots())
                .await
                .map(|()| (agent, times)),
            Err(e) => Err(e),
        };
        let (agent, times) = match ready {
            Ok(ready) => ready,
            Err(source) => {
                return Err(SandboxError::Agent {
                    source,
                    console_tail: abandon(hypervisor.as_mut(), &console).await,
                    console,
                });
            }
        };
        tracing::info!(
            agent = agent.agent_version(),
            attempts = times.attempts,
            ready = ?boot_started.elapsed(),
            "guest agent ready"
        );
        Ok(PodVm {
            hypervisor,
            agent,
            start,
            boot_started,
            agent_ready: boot_started.elapsed(),
            first_rpc: times.first_rpc,
            shutdown_timeout: config.vm.shutdown_timeout(),
            shared,
            _console: capture,
        })
    }

    /// Where the host's shared directory (the spec's `shared_dir`) is
    /// mounted in the guest, if the VM has one: container root file systems
    /// bind-mounted under the host directory appear under this path.
    pub fn guest_shared_dir(&self) -> Option<&'static Path> {
        self.shared.then(|| Path::new(GUEST_SHARED_DIR))
    }

    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// How the hypervisor started (accelerator and why).
    pub fn start_info(&self) -> &StartInfo {
        &self.start
    }

    /// The hybrid vsock socket through which the host dials guest ports
    /// (the agent's stdio streams, say).
    pub fn vsock_socket(&self) -> PathBuf {
        self.hypervisor.vsock_socket()
    }

    /// The host processes that make up the VM.
    pub fn pids(&self) -> Vec<u32> {
        self.hypervisor.pids()
    }

    /// The boot timeline, with the guest's own milestones from `details`
    /// (as GetGuestDetails returned them).
    pub fn boot_timeline(&self, details: &GuestDetails) -> BootTimeline {
        BootTimeline {
            hypervisor_spawn: self.start.spawn,
            guest: details.boot_times.as_ref().cloned().map(Into::into),
            agent_ready: self.agent_ready,
            first_rpc: self.first_rpc,
        }
    }

    /// Time since `boot` was called.
    pub fn age(&self) -> Duration {
        self.boot_started.elapsed()
    }

    /// Attaches `device` to the VM and has the guest take it: returns its
    /// slot and its device node in the guest. If the guest does not take
    /// it, the host detaches it again: nothing stays attached.
    pub async fn plug_block(&self, device: &BlockDevice) -> Result<PluggedBlock, SandboxError> {
        let slot = self.hypervisor.attach_block(device).await?;
        let taken = match self.agent.plug_virtio_mmio(slot).await {
            Ok(response) if !response.block_device.is_empty() => Ok((
                response.block_device,
                (response.block_major, response.block_minor),
            )),
            Ok(response) => Err(format!(
                "it became {} (virtio device ID {}, driver {:?}), not a block device",
                response.device_name, response.device_id, response.driver
            )),
            Err(e) => Err(e.to_string()),
        };
        match taken {
            Ok((guest_device, guest_number)) => {
                tracing::info!(slot, path = %device.path.display(), %guest_device,
                    read_only = device.read_only, "block device plugged");
                Ok(PluggedBlock {
                    slot,
                    guest_device,
                    guest_number,
                })
            }
            Err(reason) => {
                // The guest may have bound the slot before failing.
                if let Err(e) = self.agent.unplug_virtio_mmio(slot).await {
                    tracing::warn!(slot, error = %e, "cannot unbind the slot in the guest");
                }
                if let Err(e) = self.hypervisor.detach_block(slot).await {
                    tracing::error!(slot, error = %e, "cannot detach a block device the guest refused");
                }
                Err(SandboxError::BlockNotTaken {
                    path: device.path.clone(),
                    slot,
                    reason,
                })
            }
        }
    }

    /// Has the guest let go of the block device in `slot` (unmount it
    /// first), then detaches it from the VM: the host no longer holds it.
    pub async fn unplug_block(&self, slot: u32) -> Result<(), SandboxError> {
        self.agent
            .unplug_virtio_mmio(slot)
            .await
            .map_err(|source| SandboxError::BlockNotReleased { slot, source })?;
        self.hypervisor.detach_block(slot).await?;
        tracing::info!(slot, "block device unplugged");
        Ok(())
    }

    /// Asks the guest to power off, waits for the VM to end, and kills it
    /// if it has not ended within the configured shutdown timeout.
    pub async fn shutdown(mut self) -> ShutdownReport {
        let began = Instant::now();
        let mut exit = self
            .hypervisor
            .exit_watch()
            .expect("a booted VM has an exit watch");
        let agent = &self.agent;
        let powered_off = async move {
            if let Err(e) = agent.power_off().await {
                tracing::warn!(error = %e, "agent did not take the power-off request");
            }
            exit.wait().await
        };
        let forced = tokio::time::timeout(self.shutdown_timeout, powered_off)
            .await
            .is_err();
        if forced {
            tracing::warn!(timeout = ?self.shutdown_timeout, "guest did not power off in time");
        }
        let exit = self.hypervisor.stop(Duration::ZERO).await;
        ShutdownReport {
            exit,
            duration: began.elapsed(),
            forced,
        }
    }
}
