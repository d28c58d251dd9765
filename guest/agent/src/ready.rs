//! Tells the host that the agent serves, by dialing it on vsock: the host
//! connects only then, instead of knocking on a guest that is still booting.

use std::time::Duration;

use runv_protocol::{AGENT_READY_MESSAGE, AGENT_READY_VSOCK_PORT};
use tokio::io::AsyncWriteExt;
use tokio_vsock::{VsockAddr, VsockStream, VMADDR_CID_HOST};

/// The host binds its end right after starting the VM; a few retries cover
/// a guest that gets here first.
const ATTEMPTS: u32 = 100;
const RETRY_INTERVAL: Duration = Duration::from_millis(50);

pub async fn notify_host() {
    let host = VsockAddr::new(VMADDR_CID_HOST, AGENT_READY_VSOCK_PORT);
    for attempt in 1..=ATTEMPTS {
        match VsockStream::connect(host).await {
            Ok(mut stream) => {
                if let Err(e) = stream.write_all(AGENT_READY_MESSAGE).await {
                    tracing::warn!(error = %e, "cannot send the ready notification");
                }
                return;
            }
            Err(e) => {
                tracing::debug!(attempt, error = %e, "host not listening for readiness yet");
                tokio::time::sleep(RETRY_INTERVAL).await;
            }
        }
    }
    tracing::error!(
        port = AGENT_READY_VSOCK_PORT,
        "the host never took the ready notification"
    );
}
