//! Port-forwarding into the pod VM, host side. containerd serves CRI
//! PortForward by dialing 127.0.0.1:<port> in the pod's network namespace;
//! there, every such connection is steered to the shim
//! (`runv_network::loopback`), which relays it over vsock to the agent,
//! which connects to the port inside the VM.

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
    time::Duration,
};

use runv_agent_client::port_forward;
use runv_network::loopback::SteeringProgram;
use tokio::{net::TcpStream, task::JoinHandle};

/// The shim's steering program, loaded by [`prepare`].
static STEERING: OnceLock<Result<SteeringProgram, String>> = OnceLock::new();

/// Loads the steering program: before the shim's seccomp filter, which
/// denies loading one (runv_hypervisor::confine).
pub fn prepare() {
    STEERING.get_or_init(SteeringProgram::load);
}

/// Relays the pod namespace's loopback connections while it lives.
pub struct PortForwarder {
    accepting: JoinHandle<()>,
}

impl Drop for PortForwarder {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

/// Starts relaying connections to 127.0.0.1 in the network namespace
/// `netns` to the VM behind the hybrid vsock socket `vsock`. Without it
/// the pod runs on and port-forwards are refused, as the warning says.
pub fn start(netns: &Path, vsock: PathBuf) -> Option<PortForwarder> {
    let steered = match STEERING.get() {
        Some(Ok(program)) => program.steer(netns).map_err(|e| e.to_string()),
        Some(Err(e)) => Err(e.clone()),
        None => Err("the shim did not load its steering program".into()),
    };
    let steering = match steered {
        Ok(steering) => steering,
        Err(e) => {
            tracing::warn!(error = %e, "port-forward into this pod is off");
            return None;
        }
    };
    let accepting = tokio::spawn(async move {
        loop {
            match steering.accept().await {
                Ok((client, port)) => {
                    tokio::spawn(relay(client, port, vsock.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a port-forward connection");
                    // Out of descriptors, say: let some go before the next.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Some(PortForwarder { accepting })
}

async fn relay(mut client: TcpStream, port: u16, vsock: PathBuf) {
    let mut guest = match port_forward::open(&vsock, port).await {
        Ok(guest) => guest,
        Err(e) => {
            tracing::warn!(port, error = %e, "port-forward into the pod VM refused");
            // A reset, as the client would have got had nothing listened.
            let _ = client.set_zero_linger();
            return;
        }
    };
    match tokio::io::copy_bidirectional(&mut client, &mut guest).await {
        Ok((to_guest, to_client)) => {
            tracing::debug!(port, to_guest, to_client, "port-forward connection ended")
        }
        Err(e) => tracing::debug!(port, error = %e, "port-forward connection broke"),
    }
}
