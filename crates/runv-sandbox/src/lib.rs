//! A pod VM as the rest of runv sees it: a hypervisor running the guest and
//! a checked connection to the agent inside. Booting either yields both or
//! leaves nothing behind; shutting down asks the guest first and kills only
//! when it does not comply.

mod timeline;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use runv_agent_client::{AgentClient, AgentError, ConnectOptions, ReadyListener};
use runv_config::Config;
use runv_hypervisor::{process, Hypervisor, HypervisorError, StartInfo, VmExit, VmSpec};
use runv_protocol::{agent::GuestDetails, GUEST_SHARED_DIR, SHARED_FS_TAG};

pub use timeline::BootTimeline;

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
}

/// Ends a VM whose boot failed, and returns the last lines of its console
/// for the error.
async fn abandon(hypervisor: &mut dyn Hypervisor, console: &Path) -> String {
    hypervisor.stop(Duration::ZERO).await;
    process::tail(console, CONSOLE_TAIL_LINES)
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
