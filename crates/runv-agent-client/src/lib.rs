//! The host side of the agent protocol: finds the agent through the VM's
//! hybrid vsock socket, checks that it speaks our protocol version, and
//! offers typed calls. It does not know which hypervisor runs the VM.

mod containers;
pub mod hybrid_vsock;
pub mod port_forward;
pub mod stdio;

/// The status codes of the agent's answers ([`AgentError::status_code`]).
pub use ttrpc::Code;

use std::{
    io,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use runv_protocol::{
    agent, agent_ttrpc, AGENT_READY_MESSAGE, AGENT_READY_VSOCK_PORT, AGENT_VSOCK_PORT,
    PROTOCOL_VERSION,
};
use tokio::{io::AsyncReadExt, net::UnixListener};
use ttrpc::context;

/// Pause between dial attempts when one fails.
const RETRY_INTERVAL: Duration = Duration::from_millis(20);
/// Deadline of one dial attempt: handshake and Check. A lost handshake
/// must not hold up the next attempt.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot listen for the agent's ready notification on {path}: {source}")]
    Listen { path: PathBuf, source: io::Error },
    #[error(
        "the guest agent did not answer on vsock port {port} through {socket} within {waited:?} \
         (last attempt: {last_error}); check the guest console log for a kernel or agent failure, \
         or raise vm.agent_timeout_secs on a slow host"
    )]
    NotReady {
        socket: PathBuf,
        port: u32,
        waited: Duration,
        last_error: String,
    },
    #[error(
        "the guest agent {agent_version} speaks protocol version {agent}, this runv speaks \
         version {ours}: rebuild the initramfs from the same runv release \
         (scripts/build-initramfs.sh) and install it"
    )]
    ProtocolMismatch {
        agent: u32,
        ours: u32,
        agent_version: String,
    },
    #[error("agent call {method} failed: {}", describe(source))]
    Call {
        method: &'static str,
        source: ttrpc::Error,
    },
}

impl AgentError {
    /// The status code the agent answered with, if it answered.
    pub fn status_code(&self) -> Option<ttrpc::Code> {
        match self {
            AgentError::Call {
                source: ttrpc::Error::RpcStatus(status),
                ..
            } => Some(status.code()),
            _ => None,
        }
    }
}

/// A ttrpc error for people: the agent's status as `CODE: message`
/// rather than the status message's debug form.
fn describe(error: &ttrpc::Error) -> String {
    match error {
        ttrpc::Error::RpcStatus(status) => format!("{:?}: {}", status.code(), status.message()),
        other => other.to_string(),
    }
}

/// How to reach the agent.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// The guest vsock port the agent listens on.
    pub port: u32,
    /// How long to keep trying while the guest boots.
    pub timeout: Duration,
    /// The protocol version to require of the agent.
    pub protocol_version: u32,
}

impl ConnectOptions {
    pub fn new(timeout: Duration) -> Self {
        ConnectOptions {
            port: AGENT_VSOCK_PORT,
            timeout,
            protocol_version: PROTOCOL_VERSION,
        }
    }
}

/// The host end of the agent's ready notification: the agent dials host
/// port [`AGENT_READY_VSOCK_PORT`] once it serves, and only then does the
/// host dial the agent. Bind it as soon as the VM's vsock socket exists,
/// before the guest can get that far.
pub struct ReadyListener {
    listener: UnixListener,
    path: PathBuf,
}

impl ReadyListener {
    /// Listens beside the VM's hybrid vsock `socket`.
    pub fn bind(socket: &Path) -> Result<ReadyListener, AgentError> {
        let path = hybrid_vsock::listener_path(socket, AGENT_READY_VSOCK_PORT);
        match hybrid_vsock::listen(socket, AGENT_READY_VSOCK_PORT) {
            Ok(listener) => Ok(ReadyListener { listener, path }),
            Err(source) => Err(AgentError::Listen { path, source }),
        }
    }

    /// Waits for the agent's notification.
    async fn wait(&self) -> Result<(), String> {
        let (mut stream, _) = self.listener.accept().await.map_err(|e| e.to_string())?;
        let mut message = vec![0; AGENT_READY_MESSAGE.len()];
        stream
            .read_exact(&mut message)
            .await
            .map_err(|e| format!("reading the ready notification: {e}"))?;
        if message != AGENT_READY_MESSAGE {
            return Err(format!(
                "unexpected ready notification {:?}",
                String::from_utf8_lossy(&message)
            ));
        }
        Ok(())
    }
}

/// The socket goes with the listener: once the agent is ready nothing
/// listens there, and a stale socket is only a name for the guest to aim at.
impl Drop for ReadyListener {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the ready socket");
        }
    }
}

/// When the connection came about, for the boot timeline.
#[derive(Debug, Clone, Copy)]
pub struct ConnectTimes {
    /// The round trip of the first answered Check.
    pub first_rpc: Duration,
    /// Attempts it took.
    pub attempts: u32,
}

/// A checked connection to runv-agent.
pub struct AgentClient {
    client: agent_ttrpc::AgentClient,
    agent_version: String,
    /// Deadline of one call: the configured agent timeout
    /// (`vm.agent_timeout_secs`), which an operator raises on a slow host.
    call_timeout: Duration,
}

impl AgentClient {
    /// Waits for the agent's ready notification on `ready`, then dials the
    /// agent through `socket` until it answers Check, all within
    /// `options.timeout`, and requires a matching protocol version.
    pub async fn connect(
        socket: &Path,
        ready: ReadyListener,
        options: &ConnectOptions,
    ) -> Result<(AgentClient, ConnectTimes), AgentError> {
        let start = Instant::now();
        let not_ready = |last_error: String| AgentError::NotReady {
            socket: socket.to_owned(),
            port: options.port,
            waited: start.elapsed(),
            last_error,
        };
        match tokio::time::timeout(options.timeout, ready.wait()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(not_ready(e)),
            Err(_) => return Err(not_ready("the agent never reported ready".into())),
        }
        drop(ready);
        let mut attempts = 0;
        loop {
            attempts += 1;
            let remaining = options.timeout.saturating_sub(start.elapsed());
            let attempt = Self::try_check(socket, options);
            let last_error =
                match tokio::time::timeout(remaining.min(ATTEMPT_TIMEOUT), attempt).await {
                    Ok(Ok((client, response, first_rpc))) => {
                        if response.protocol_version != options.protocol_version {
                            return Err(AgentError::ProtocolMismatch {
                                agent: response.protocol_version,
                                ours: options.protocol_version,
                                agent_version: response.agent_version,
                            });
                        }
                        let times = ConnectTimes {
                            first_rpc,
                            attempts,
                        };
                        let client = AgentClient {
                            client,
                            agent_version: response.agent_version,
                            call_timeout: options.timeout,
                        };
                        return Ok((client, times));
                    }
                    Ok(Err(e)) => e,
                    Err(_) => "timed out".to_owned(),
                };
            if start.elapsed() + RETRY_INTERVAL >= options.timeout {
                return Err(not_ready(last_error));
            }
            tracing::debug!(attempts, %last_error, "agent dial failed, retrying");
            tokio::time::sleep(RETRY_INTERVAL).await;
        }
    }

    /// One attempt: dial, then Check.
    async fn try_check(
        socket: &Path,
        options: &ConnectOptions,
    ) -> Result<(agent_ttrpc::AgentClient, agent::CheckResponse, Duration), String> {
        let stream = hybrid_vsock::connect(socket, options.port)
            .await
            .map_err(|e| e.to_string())?;
        let client = agent_ttrpc::AgentClient::new(ttrpc::r#async::Client::new(stream.into()));
        let host_time_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_nanos() as u64);
        let request = agent::CheckRequest {
            protocol_version: options.protocol_version,
            host_time_ns,
            ..Default::default()
        };
        let sent = Instant::now();
        let response = client
            .check(
                context::with_timeout(ATTEMPT_TIMEOUT.as_nanos() as i64),
                &request,
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok((client, response, sent.elapsed()))
    }

    /// The agent's crate version, as it reported it.
    pub fn agent_version(&self) -> &str {
        &self.agent_version
    }

    pub async fn guest_details(&self) -> Result<agent::GuestDetails, AgentError> {
        self.client
            .get_guest_details(self.call_context(), &agent::GetGuestDetailsRequest::new())
            .await
            .map_err(|source| AgentError::Call {
                method: "GetGuestDetails",
                source,
            })
    }

    /// Has the guest take the device the host has just put into
    /// virtio-mmio slot `slot`, and says which virtio device it became
    /// and, for a disk, its block device node (`block_device`). The agent
    /// waits up to 5 s for them.
    pub async fn plug_virtio_mmio(
        &self,
        slot: u32,
    ) -> Result<agent::PlugVirtioMmioResponse, AgentError> {
        let request = agent::PlugVirtioMmioRequest {
            slot,
            ..Default::default()
        };
        self.client
            .plug_virtio_mmio(self.call_context(), &request)
            .await
            .map_err(|source| AgentError::Call {
                method: "PlugVirtioMmio",
                source,
            })
    }

    /// Has the guest let go of the device in virtio-mmio slot `slot`,
    /// before the host empties the slot.
    pub async fn unplug_virtio_mmio(&self, slot: u32) -> Result<(), AgentError> {
        let request = agent::UnplugVirtioMmioRequest {
            slot,
            ..Default::default()
        };
        self.client
            .unplug_virtio_mmio(self.call_context(), &request)
            .await
            .map(drop)
            .map_err(|source| AgentError::Call {
                method: "UnplugVirtioMmio",
                source,
            })
    }

    /// Has the guest mount the virtio-fs device tagged `tag` on
    /// `mount_point` and check that the host's backend answers. Mounting it
    /// again at the same place is a no-op.
    pub async fn mount_virtio_fs(&self, tag: &str, mount_point: &str) -> Result<(), AgentError> {
        let request = agent::MountVirtioFsRequest {
            tag: tag.to_owned(),
            mount_point: mount_point.to_owned(),
            ..Default::default()
        };
        self.client
            .mount_virtio_fs(self.call_context(), &request)
            .await
            .map(drop)
            .map_err(|source| AgentError::Call {
                method: "MountVirtioFs",
                source,
            })
    }

    /// Has the guest mount the block device `source` (e.g. a plugged
    /// disk's `block_device`) on `mount_point`, created if missing.
    /// `fs_type` empty detects the file system; `options` are mount(8)'s
    /// ("ro", "noatime", "errors=remount-ro"; bind and remount are
    /// refused). Mounting the same source there again is a no-op.
    pub async fn mount(
        &self,
        source: &str,
        fs_type: &str,
        options: &[String],
        mount_point: &str,
    ) -> Result<(), AgentError> {
        let request = agent::MountRequest {
            source: source.to_owned(),
            fs_type: fs_type.to_owned(),
            options: options.to_vec(),
            mount_point: mount_point.to_owned(),
            ..Default::default()
        };
        self.client
            .mount(self.call_context(), &request)
            .await
            .map(drop)
            .map_err(|source| AgentError::Call {
                method: "Mount",
                source,
            })
    }

    /// Has the guest unmount `mount_point` and remove the directory, before
    /// the host unplugs the disk under it. A busy file system fails with
    /// [`Code::FAILED_PRECONDITION`] and stays mounted; a mount point that
    /// is not mounted is a no-op.
    pub async fn unmount(&self, mount_point: &str) -> Result<(), AgentError> {
        let request = agent::UnmountRequest {
            mount_point: mount_point.to_owned(),
            ..Default::default()
        };
        self.client
            .unmount(self.call_context(), &request)
            .await
            .map(drop)
            .map_err(|source| AgentError::Call {
                method: "Unmount",
                source,
            })
    }

    /// Has the guest configure the pod's network once after boot: each
    /// NIC, found by MAC address (the agent waits up to 5 s for them), is
    /// renamed, given its MTU and addresses and brought up, then the
    /// routes are added in order and the permanent neighbour entries last.
    /// A malformed request fails with [`Code::INVALID_ARGUMENT`] before
    /// anything changes, a NIC that never appears with
    /// [`Code::NOT_FOUND`]. Sending the same request again is harmless.
    pub async fn configure_network(
        &self,
        request: &agent::ConfigureNetworkRequest,
    ) -> Result<(), AgentError> {
        self.client
            .configure_network(self.call_context(), request)
            .await
            .map(drop)
            .map_err(|source| AgentError::Call {
                method: "ConfigureNetwork",
                source,
            })
    }

    /// Asks the guest to power off. The VM ends shortly after the reply.
    pub async fn power_off(&self) -> Result<(), AgentError> {
        self.client
            .power_off(self.call_context(), &agent::PowerOffRequest::new())
            .await
            .map(drop)
            .map_err(|source| AgentError::Call {
                method: "PowerOff",
                source,
            })
    }
}

impl AgentClient {
    fn call_context(&self) -> context::Context {
        context::with_timeout(self.call_timeout.as_nanos() as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_statuses_read_as_code_and_message() {
        let error = AgentError::Call {
            method: "CreateContainer",
            source: ttrpc::Error::RpcStatus(ttrpc::get_status(
                Code::INVALID_ARGUMENT,
                "the working directory x is not an absolute path",
            )),
        };
        assert_eq!(
            error.to_string(),
            "agent call CreateContainer failed: INVALID_ARGUMENT: the working directory x is \
             not an absolute path"
        );
        assert_eq!(error.status_code(), Some(Code::INVALID_ARGUMENT));
        let local = AgentError::Call {
            method: "WaitProcess",
            source: ttrpc::Error::LocalClosed,
        };
        assert_eq!(local.status_code(), None);
    }
}
