//! Every vsock listener of the agent admits the host only. AF_VSOCK is not
//! namespaced: any process in any container of the pod can connect to the
//! agent's ports, by the guest's own CID or (where the kernel has vsock
//! loopback) CID 1. Only a connection whose peer is the host (CID 2) comes
//! from the shim; any other is closed before a byte of it is read.

use std::io;

use futures_util::stream::{self, Stream};
use tokio_vsock::{VsockAddr, VsockListener, VsockStream, VMADDR_CID_HOST};

/// Why a connection from `peer` is refused, or None for the host.
fn refusal(peer: &VsockAddr) -> Option<String> {
    (peer.cid() != VMADDR_CID_HOST).then(|| {
        format!(
            "refused a vsock connection from CID {} port {}: only the host (CID {VMADDR_CID_HOST}) \
             may connect to the agent",
            peer.cid(),
            peer.port()
        )
    })
}

/// The next connection from the host; others are closed and logged.
pub async fn accept(listener: &VsockListener) -> io::Result<VsockStream> {
    loop {
        let (connection, peer) = listener.accept().await?;
        match refusal(&peer) {
            None => return Ok(connection),
            Some(reason) => {
                // Dropping closes it unread.
                drop(connection);
                let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
                tracing::warn!(port, "{reason}");
            }
        }
    }
}

/// The host's connections to `listener`, as a stream (what ttrpc serves).
pub fn incoming(listener: VsockListener) -> impl Stream<Item = io::Result<VsockStream>> {
    stream::unfold(listener, |listener| async move {
        let next = accept(&listener).await;
        Some((next, listener))
    })
}

#[cfg(test)]
mod tests {
    use tokio_vsock::{VMADDR_CID_ANY, VMADDR_CID_LOCAL};

    use super::*;

    #[test]
    fn admits_the_host_only() {
        assert_eq!(refusal(&VsockAddr::new(VMADDR_CID_HOST, 51234)), None);
        // Loopback, the hypervisor's CID, the guest's own CID (3 and up),
        // another VM's, and the wildcard are all someone other than the shim.
        for cid in [VMADDR_CID_LOCAL, 0, 3, 4, 1000, VMADDR_CID_ANY] {
            let reason = refusal(&VsockAddr::new(cid, 51234))
                .unwrap_or_else(|| panic!("CID {cid} was admitted"));
            assert!(
                reason.contains(&format!("from CID {cid} port 51234")),
                "{reason}"
            );
        }
    }
}
